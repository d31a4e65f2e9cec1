"""Everything is in pyproject.toml but one file: `gpt2lab_lm_eval.pth` goes to site-packages itself, so
that `lm_eval --model gpt2lab` works on lm-eval releases that do not read entry points (see
src/gpt2lab/lm_eval_plugin.py); setuptools can place a file there only from a build step."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "gpt2lab_lm_eval.pth"


class BuildWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(str(Path("src") / PTH), str(self._pth_dir() / PTH), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(self._pth_dir() / PTH)]

    def _pth_dir(self) -> Path:
        # An editable install packs the wheel from the install folder, not from build_lib.
        if getattr(self, "editable_mode", False):
            return Path(self.get_finalized_command("install").install_lib)
        return Path(self.build_lib)


setup(cmdclass={"build_py": BuildWithPth})
