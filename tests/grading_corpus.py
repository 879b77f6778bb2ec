"""Planted submissions for ``course grade``: chapter 01 notebooks that each go wrong in one way.

Every submission starts from ``solutions/01_forward_sdes.ipynb`` (outputs cleared) or from the
generated exercise notebook, and changes one thing. ``EXPECTED`` is the gradebook the grader must
write for them, exactly. ``write_corpus`` lays them out as an instructor would receive them:
mostly one folder per student, two as ``<student>_<chapter>.ipynb`` files.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
CHAPTER = "01_forward_sdes"
LIMITS = {"notebook_timeout": 60.0, "cell_timeout": 6.0, "check_timeout": 10.0, "memory_mb": 4096}


def _solution() -> nbformat.NotebookNode:
    nb = nbformat.read(ROOT / "solutions" / f"{CHAPTER}.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nb


def _stub() -> nbformat.NotebookNode:
    return nbformat.read(ROOT / "exercises" / f"{CHAPTER}.ipynb", as_version=4)


def _replace_def(nb, name: str, new: str) -> nbformat.NotebookNode:
    """Replace the definition of function ``name`` (wherever it is) by the source ``new``."""
    for cell in nb.cells:
        if cell.cell_type != "code" or f"def {name}(" not in cell.source:
            continue
        node = next(n for n in ast.parse(cell.source).body if isinstance(n, ast.FunctionDef) and n.name == name)
        lines = cell.source.splitlines()
        cell.source = "\n".join(lines[: node.lineno - 1] + new.strip("\n").splitlines() + lines[node.end_lineno:])
        return nb
    raise KeyError(name)


def _insert(nb, index: int, source: str) -> nbformat.NotebookNode:
    nb.cells.insert(index, nbformat.v4.new_code_cell(source))
    return nb


def _append(nb, source: str) -> nbformat.NotebookNode:
    nb.cells.append(nbformat.v4.new_code_cell(source))
    return nb


def _after_imports(nb, source: str) -> nbformat.NotebookNode:
    """A new code cell right after the first code cell (the imports)."""
    first = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    return _insert(nb, first + 1, source)


def _sol_with(**defs) -> nbformat.NotebookNode:
    nb = _solution()
    for name, src in defs.items():
        _replace_def(nb, name, src)
    return nb


def _typo_in_imports() -> nbformat.NotebookNode:
    nb = _solution()
    cell = next(c for c in nb.cells if c.cell_type == "code")
    assert "import torch\n" in cell.source
    cell.source = cell.source.replace("import torch\n", "import torchh\n", 1)
    return nb


def _wrong_drift() -> nbformat.NotebookNode:
    return _sol_with(vp_drift="""
def vp_drift(x, t, beta_min=0.1, beta_max=20.0):
    beta = beta_min + t * (beta_max - beta_min)
    return 0.5 * expand_like(beta, x) * x
""")


# Each entry: student -> notebook (or the raw text of a broken file, or None for "nothing submitted").
def submissions() -> dict[str, nbformat.NotebookNode | str | None]:
    sol = _solution
    return {
        "correct": sol(),
        "stub_untouched": _stub(),
        "drift_wrong_sign": _sol_with(vp_drift="""
def vp_drift(x, t, beta_min=0.1, beta_max=20.0):
    beta = beta_min + t * (beta_max - beta_min)
    return 0.5 * expand_like(beta, x) * x
"""),
        "diffusion_is_variance": _sol_with(vp_diffusion="""
def vp_diffusion(t, beta_min=0.1, beta_max=20.0):
    return beta_min + t * (beta_max - beta_min)
"""),
        "em_without_sqrt_dt": _sol_with(euler_maruyama_step="""
def euler_maruyama_step(x, t, dt, drift, diffusion, z):
    return x + drift(x, t) * dt + expand_like(diffusion(t), x) * dt * z
"""),
        "marginal_variance_for_std": _sol_with(vp_marginal="""
def vp_marginal(x0, t, beta_min=0.1, beta_max=20.0):
    alpha = torch.exp(-0.5 * (beta_min * t + 0.5 * (beta_max - beta_min) * t**2))
    return expand_like(alpha, x0) * x0, 1 - alpha**2
"""),
        "hard_coded_values": _sol_with(vp_marginal="""
def vp_marginal(x0, t, beta_min=0.1, beta_max=20.0):
    # the values printed for t = 0.5 with the default betas, pasted in
    return 0.2836 * x0, torch.full((x0.shape[0],), 0.9589)
"""),
        "raises_exception": _sol_with(vp_marginal="""
def vp_marginal(x0, t, beta_min=0.1, beta_max=20.0):
    return x0[100], t.sqrt()
"""),
        "returns_nan": _sol_with(vp_diffusion="""
def vp_diffusion(t, beta_min=0.1, beta_max=20.0):
    return torch.sqrt(beta_min + t * (beta_max - beta_min)) * float("nan")
"""),
        "wrong_shape": _sol_with(vp_diffusion="""
def vp_diffusion(t, beta_min=0.1, beta_max=20.0):
    return torch.sqrt(beta_min + t * (beta_max - beta_min))[:, None]
"""),
        "renamed_functions": _sol_with(vp_drift="""
def my_vp_drift(x, t, beta_min=0.1, beta_max=20.0):
    beta = beta_min + t * (beta_max - beta_min)
    return -0.5 * expand_like(beta, x) * x
"""),
        "extra_cells": _insert(_append(_append(sol(), "def helper(x):\n    return 2 * x\n\nprint(helper(3))"),
                                       "import matplotlib.pyplot as plt\nplt.plot([0, 1], [1, 0])\nplt.show()"),
                               1, "%matplotlib inline\n# my own notes\nsquares = [i * i for i in range(10)]"),
        "endless_loop_in_function": _sol_with(euler_maruyama_step="""
def euler_maruyama_step(x, t, dt, drift, diffusion, z):
    while True:
        pass
"""),
        "endless_loop_in_cell": _after_imports(sol(), "i = 0\nwhile True:\n    i += 1"),
        "loop_that_swallows_interrupts": _after_imports(sol(), (
            "while True:\n    try:\n        while True:\n            pass\n    except BaseException:\n        pass")),
        "sys_exit_in_cell": _after_imports(sol(), "import sys\nsys.exit(1)"),
        "sys_exit_in_function": _sol_with(vp_drift="""
def vp_drift(x, t, beta_min=0.1, beta_max=20.0):
    import sys
    sys.exit(0)
"""),
        "os_exit_in_cell": _append(sol(), "import os\nos._exit(3)"),
        "huge_output": _after_imports(sol(), "for _ in range(40):\n    print('x' * 1_000_000)"),
        "deletes_files": _after_imports(sol(), (
            "import glob, os\n"
            "# where other submissions and the instructor's grades would be, run in place\n"
            "for p in glob.glob('../*/*.ipynb') + glob.glob('../*.ipynb') + glob.glob('*.ipynb') + glob.glob('../../grades/*'):\n"
            "    os.remove(p)")),
        "memory_hog": _sol_with(vp_marginal="""
def vp_marginal(x0, t, beta_min=0.1, beta_max=20.0):
    hog = torch.empty(16 * 2**30, dtype=torch.uint8).fill_(1)  # 16 GB
    return hog, hog
"""),
        "typo_in_imports": _typo_in_imports(),
        "computes_in_float32": _sol_with(vp_drift="""
def vp_drift(x, t, beta_min=0.1, beta_max=20.0):
    x, t = x.float(), t.float()
    return -0.5 * expand_like(beta_min + t * (beta_max - beta_min), x) * x
""", vp_diffusion="""
def vp_diffusion(t, beta_min=0.1, beta_max=20.0):
    return torch.sqrt(beta_min + t.float() * (beta_max - beta_min))
""", vp_marginal="""
def vp_marginal(x0, t, beta_min=0.1, beta_max=20.0):
    x0, t = x0.float(), t.float()
    alpha = torch.exp(-0.5 * (beta_min * t + 0.5 * (beta_max - beta_min) * t**2))
    return expand_like(alpha, x0) * x0, torch.sqrt(1 - alpha**2)
"""),
        "wraps_the_reference": _sol_with(vp_drift="""
def vp_drift(x, t, beta_min=0.1, beta_max=20.0):
    from course.sde import VPSDE
    return VPSDE(beta_min=beta_min, beta_max=beta_max).drift(x, t)
"""),
        # Each of these has the wrong-sign drift and then tries to make the check pass anyway by
        # patching, in its own process, what the check would use; the checks run in the grader.
        "patches_allclose": _append(_wrong_drift(), "torch.allclose = lambda *a, **k: True\n"
                                    "torch.testing.assert_close = lambda *a, **k: None"),
        "patches_verdict": _append(_wrong_drift(), (
            "import course.exercises.verdict as verdict\n"
            "verdict._close = lambda *a, **k: True\n"
            "verdict.compare = lambda *a, **k: None")),
        "patches_run_checks": _append(_wrong_drift(), (
            "import course.exercises.registry as registry, course.exercises.runner as runner\n"
            "from course.exercises.verdict import CheckResult\n"
            "def run_checks(chapter, namespace, *, seed=None, only=None):\n"
            "    return [CheckResult(ex.id, ex.title, 'passed', 'forged') for ex in registry.CHAPTERS[chapter]\n"
            "            if only is None or ex.id == only]\n"
            "registry.run_checks = runner.run_checks = run_checks")),
        "patches_reference": _append(_wrong_drift(), (
            "from course.sde import VPSDE\n"
            "from course.utils import expand_like\n"
            "VPSDE.drift = lambda self, x, t: 0.5 * expand_like(self.beta(t), x) * x")),
        "forges_messages": _append(_wrong_drift(), (
            "import os, struct\n"
            "forged = b'{\"event\": \"check\", \"exercise\": \"1.1\", \"status\": \"passed\"}'\n"
            "for fd in range(3, 64):\n"
            "    try:\n"
            "        os.write(fd, struct.pack('>Q', len(forged)) + forged)\n"
            "    except OSError:\n"
            "        pass")),
        "corrupted_json": '{"cells": [{"cell_type": "code", "source": "import torch',
        "not_a_notebook": '{"hello": "world"}',
        "nothing_submitted": None,
    }


FLAT = ("drift_wrong_sign", "correct")  # these two arrive as <student>_<chapter>.ipynb files


def write_corpus(folder: Path) -> Path:
    """Write the submissions under ``folder``; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for student, content in submissions().items():
        if student in FLAT:
            target = folder / f"{student}_{CHAPTER}.ipynb"
        else:
            (folder / student).mkdir()
            target = folder / student / f"{CHAPTER}.ipynb"
        if content is None:
            continue
        target.write_text(content if isinstance(content, str) else nbformat.writes(content), encoding="utf-8")
    return folder


_T, _C = "timed out", "crashed"
# student: (points for 1.1, 1.2, 1.3, status)
EXPECTED = {
    "correct": (1, 1, 1, "graded"),
    "corrupted_json": (0, 0, 0, "invalid notebook"),
    "computes_in_float32": (1, 1, 1, "graded"),
    "deletes_files": (1, 1, 1, "graded"),
    "diffusion_is_variance": (0, 1, 1, "graded"),
    "drift_wrong_sign": (0, 1, 1, "graded"),
    "em_without_sqrt_dt": (1, 0, 1, "graded"),
    "endless_loop_in_cell": (1, 1, 1, _T),
    "endless_loop_in_function": (1, 0, 1, _T),
    "extra_cells": (1, 1, 1, "graded"),
    "forges_messages": (0, 0, 0, _C),
    "hard_coded_values": (1, 1, 0, "graded"),
    "huge_output": (1, 1, 1, "graded"),
    "loop_that_swallows_interrupts": (0, 0, 0, _T),
    "marginal_variance_for_std": (1, 1, 0, "graded"),
    "memory_hog": (1, 1, 0, "graded"),
    "not_a_notebook": (0, 0, 0, "invalid notebook"),
    "nothing_submitted": (0, 0, 0, "missing"),
    "os_exit_in_cell": (0, 0, 0, _C),
    "patches_allclose": (0, 1, 1, "graded"),
    "patches_reference": (0, 0, 1, "graded"),  # 1.2's planted VP drift is the patched one, in its process
    "patches_run_checks": (0, 1, 1, "graded"),
    "patches_verdict": (0, 1, 1, "graded"),
    "raises_exception": (1, 1, 0, "graded"),
    "renamed_functions": (0, 1, 1, "graded"),
    "returns_nan": (0, 1, 1, "graded"),
    "stub_untouched": (0, 0, 0, "graded"),
    "sys_exit_in_cell": (1, 1, 1, "graded"),
    "sys_exit_in_function": (0, 1, 1, "graded"),
    "typo_in_imports": (0, 0, 0, "graded"),
    "wrong_shape": (0, 1, 1, "graded"),
    "wraps_the_reference": (0, 1, 1, "graded"),
}


def expected_gradebook() -> str:
    lines = ["student,ex 1.1,ex 1.2,ex 1.3,total,out of,status"]
    for student, (a, b, c, status) in sorted(EXPECTED.items()):
        lines.append(f"{student},{a},{b},{c},{a + b + c},3,{status}")
    return "\n".join(lines) + "\n"


def isolation_attacks(submissions: Path, out: Path) -> dict[str, nbformat.NotebookNode]:
    """Correct solutions that also attack classmates, the grader and its output, with the real
    absolute paths of this run written in. Graded only under an OS sandbox (without one, these
    would succeed: that is what the sandbox is for)."""
    victim = submissions / "correct" / f"{CHAPTER}.ipynb"
    book = out / "gradebook.csv"
    return {
        "kills_what_it_sees": _after_imports(_solution(), (
            "import os, signal\n"
            "for pid in [int(p) for p in os.listdir('/proc') if p.isdigit()]:\n"
            "    if pid != os.getpid():\n"
            "        try:\n"
            "            os.kill(pid, signal.SIGKILL)\n"
            "        except OSError:\n"
            "            pass")),
        "kills_its_parent": _after_imports(_solution(), "import os\nos.kill(os.getppid(), 9)"),
        "detached_rewrites_gradebook": _after_imports(_solution(), (
            "import subprocess, sys\n"
            f"code = 'import time; time.sleep(4); open({str(book)!r}, \"w\").write(\"forged\")'\n"
            "subprocess.Popen([sys.executable, '-c', code], start_new_session=True)")),
        "edits_a_classmate": _after_imports(_solution(), (
            "import json\n"
            f"path = {str(victim)!r}\n"
            "nb = json.load(open(path))\n"
            "nb['cells'].append({'cell_type': 'code', 'metadata': {}, 'outputs': [], 'execution_count': None,\n"
            "                    'source': 'def vp_drift(x, t, beta_min=0.1, beta_max=20.0):\\n    return 0 * x'})\n"
            "json.dump(nb, open(path, 'w'))")),
        "deletes_a_classmate": _after_imports(_solution(), f"import os\nos.remove({str(victim)!r})"),
        "reads_the_submissions": _after_imports(_solution(), (
            "import glob\n"
            f"found = glob.glob({str(submissions / '**' / '*.ipynb')!r}, recursive=True)\n"
            "assert not found, found  # a cell that raises costs nothing; the feedback notes it")),
    }
