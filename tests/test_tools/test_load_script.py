"""``cenet_mmdet.testing.scripts.load_script``: the one loader the tests use
for the repository's scripts."""
import sys

import pytest

from cenet_mmdet.testing.scripts import load_script


def write_scripts(folder):
    (folder / 'sibling_of_script.py').write_text('VALUE = 7\n')
    (folder / 'script.py').write_text(
        'import sibling_of_script\nDOUBLE = 2 * sibling_of_script.VALUE\n')
    return str(folder / 'script.py')


def test_with_siblings_imports_them_and_restores_sys_path(tmp_path):
    path = write_scripts(tmp_path)
    before = list(sys.path)
    module = load_script(path, '_script_with_siblings', with_siblings=True)
    sys.modules.pop('sibling_of_script', None)
    assert module.DOUBLE == 14 and module.__name__ == '_script_with_siblings'
    assert sys.path == before
    assert '_script_with_siblings' not in sys.modules
    assert load_script(path, '_again', with_siblings=True) is not module  # fresh
    sys.modules.pop('sibling_of_script', None)


def test_without_siblings_the_sibling_import_fails_and_sys_path_is_kept(tmp_path):
    path = write_scripts(tmp_path)
    before = list(sys.path)
    with pytest.raises(ModuleNotFoundError, match='sibling_of_script'):
        load_script(path, '_script_alone')
    assert sys.path == before


def test_a_file_that_is_no_python_module_is_refused(tmp_path):
    path = tmp_path / 'notes.txt'
    path.write_text('not python\n')
    with pytest.raises(ImportError, match='cannot load .*notes.txt as a module'):
        load_script(str(path), '_notes')
