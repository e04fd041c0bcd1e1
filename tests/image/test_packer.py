"""The Packer template validates with Debian's packer (1.6.6), as `packer validate` is run on
it before a build."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_packer_template_validates(tmp_path: Path) -> None:
    if shutil.which("packer") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("packer and ssh-keygen are installed by scripts/bootstrap.sh")
    # Packer 1.6.6 checks that the SSH key and the uploaded wheels exist; image/build.sh
    # --packer-base makes them (and the base disk the build boots). Stand-ins here.
    (tmp_path / "wheels").mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                    str(tmp_path / "packer_ed25519")], check=True)
    # (and that the output directory does not exist yet: a build of one's own may be there)
    result = subprocess.run(["packer", "validate", "-var", f"build_dir={tmp_path}", "-var",
                             f"output_dir={tmp_path / 'out'}", "packer/"],
                            cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
