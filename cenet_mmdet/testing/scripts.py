"""Load a script of the repository (``tools/...``) as a module, for tests."""
import importlib.util
import os.path as osp
import sys
from types import ModuleType


def load_script(path: str, module_name: str, with_siblings: bool = False) -> ModuleType:
    """The script at ``path`` executed as a fresh module named ``module_name``.

    Args:
        path: the script's file path.
        module_name: the name it gets (not registered in ``sys.modules``).
        with_siblings: put the script's folder on ``sys.path`` while it runs
            its top level, for scripts that import their siblings (removed
            again afterwards). Default: False.
    """
    folder = osp.dirname(osp.abspath(path))
    if with_siblings:
        sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f'cannot load {path} as a module')
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if with_siblings:
            sys.path.remove(folder)
    return module
