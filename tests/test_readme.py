"""The README's set-up as a new user copies it: on a machine without a GPU, torch's CPU build comes before the
requirements (else pip pulls several GB of CUDA packages), and CI runs the test command the README gives."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_set_up_installs_torchs_cpu_build_first():
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set-up and running", 1)[1]
    first_block = re.search(r"```bash\n(.*?)```", setup, re.S).group(1)
    installs = [line for line in first_block.splitlines() if line.startswith("pip install")]
    assert installs[0].startswith("pip install torch") and "download.pytorch.org/whl/cpu" in installs[0], installs
    assert installs[1] == "pip install -r requirements.txt", installs


def test_ci_runs_the_readmes_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest tests" in readme
    assert "python3 -m pytest tests" in ci
    assert ci.index("pip install -q torch==2.13.0") < ci.index("-r requirements.txt"), "the CPU wheel first"
