"""ImageNet-layout image-folder dataset (MMPretrain's ``ImageNet`` fields).

Two layouts, as MMPretrain reads them::

    data/imagenet/train/<class>/<image>       class sub-folders (labels: the
                                              sorted folder names)
    data/imagenet/meta/train.txt              optional list: "<path> <label>"
    data/imagenet/val/<image> or val/<class>/<image>
    data/imagenet/meta/val.txt

With ``split='train'`` the images are under ``<data_root>/train`` and the list
``<data_root>/meta/train.txt`` is used when it exists, else the class
sub-folders are scanned. ``data_prefix`` and ``ann_file`` can also be given
explicitly (relative to ``data_root``). Errors name the file at fault.
"""
import os
import os.path as osp
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

from mmengine.dataset import BaseDataset
from mmdet.registry import DATASETS, TRANSFORMS

#: image file extensions found by the folder scan (lower case)
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif',
                  '.tiff', '.webp')


@DATASETS.register_module()
class ImageNet(BaseDataset):
    """Image classification data in the ImageNet folder layout.

    Each item is ``dict(img_path=str, gt_label=int)`` before the pipeline.

    Args:
        data_root: root of the data set, e.g. ``'data/imagenet'``.
            Default: ''.
        split: ``'train'``, ``'val'`` or ``'test'``: sets ``data_prefix`` to
            the split's folder and ``ann_file`` to ``meta/<split>.txt`` when
            that file exists (each only when not given). Default: ''.
        data_prefix: image folder (relative to ``data_root``), or
            ``dict(img_path=...)``. Default: ''.
        ann_file: list file, one ``<image path relative to data_prefix>
            <label>`` per line; '' scans class sub-folders. Default: ''.
        classes: class names; label ``i`` is ``classes[i]``. Default: None
            (the sorted sub-folder names of the image folder; for a list
            file over a flat folder, ``'0'..'K-1'`` with K = max label + 1).
        extensions: image extensions found by the folder scan.
            Default: :data:`IMG_EXTENSIONS`.
        **kwargs: the arguments of ``mmengine.dataset.BaseDataset``
            (``pipeline``, ``test_mode``, ``metainfo``, ``lazy_init``, ...).

    Raises:
        FileNotFoundError: missing image folder, list file, or a listed image.
        ValueError: a malformed list line or label, no class sub-folders, a
            class folder without images.
    """

    METAINFO = dict(classes=None)

    def __init__(self,
                 data_root: str = '',
                 split: str = '',
                 data_prefix: Union[str, Dict[str, str]] = '',
                 ann_file: str = '',
                 classes: Optional[Sequence[str]] = None,
                 extensions: Sequence[str] = IMG_EXTENSIONS,
                 metainfo: Optional[dict] = None,
                 **kwargs) -> None:
        if split:
            if split not in ('train', 'val', 'test'):
                raise ValueError(f"split must be 'train', 'val' or 'test', "
                                 f'got {split!r}')
            if not data_prefix:
                data_prefix = split
            if not ann_file and osp.isfile(
                    osp.join(data_root, 'meta', f'{split}.txt')):
                ann_file = osp.join('meta', f'{split}.txt')
        if isinstance(data_prefix, str):
            data_prefix = dict(img_path=data_prefix)
        metainfo = dict(metainfo or {})
        if classes is not None:
            metainfo['classes'] = tuple(classes)
        self.extensions = tuple(ext.lower() for ext in extensions)
        # transforms from MMDetection's registry (it holds RandomResizedCrop
        # and friends; MMEngine's Compose would use the root registry when no
        # default scope is set)
        kwargs['pipeline'] = [
            TRANSFORMS.build(t) if isinstance(t, dict) else t
            for t in kwargs.get('pipeline', [])]
        super().__init__(ann_file=ann_file, metainfo=metainfo,
                         data_root=data_root, data_prefix=data_prefix,
                         **kwargs)

    @property
    def image_folder(self) -> str:
        """The folder that holds the images (``data_root`` joined)."""
        return self.data_prefix['img_path']

    @property
    def CLASSES(self) -> Optional[Tuple[str, ...]]:  # noqa: N802 (MMPretrain)
        return self._metainfo.get('classes')

    def load_data_list(self) -> List[dict]:
        """Read the list file or scan the class folders (see class doc)."""
        folder = self.image_folder
        if not osp.isdir(folder):
            raise FileNotFoundError(
                f'image folder not found: {folder} (data_root='
                f'{self.data_root!r}); expected the ImageNet layout '
                f'<data_root>/<split>/<class>/<image> or <data_root>/<split>/'
                f'<image> with <data_root>/meta/<split>.txt')
        given = self._metainfo.get('classes')
        if self.ann_file:
            samples, classes = self._read_list(folder, given)
        else:
            samples, classes = self._scan_folders(folder, given)
        self._metainfo['classes'] = classes
        return [dict(img_path=path, gt_label=label) for path, label in samples]

    def _sub_folders(self, folder: str) -> List[str]:
        return sorted(entry.name for entry in os.scandir(folder)
                      if entry.is_dir())

    def _read_list(self, folder: str, given: Optional[Sequence[str]]
                   ) -> Tuple[List[Tuple[str, int]], Tuple[str, ...]]:
        ann_file = self.ann_file
        if not osp.isfile(ann_file):
            raise FileNotFoundError(f'annotation list not found: {ann_file}')
        classes = tuple(given) if given is not None else None
        if classes is None:
            classes = tuple(self._sub_folders(folder)) or None
        samples: List[Tuple[str, int]] = []
        listings: Dict[str, Set[str]] = {}  # one listdir per image directory
        missing: List[str] = []
        with open(ann_file) as f:
            for number, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                parts = line.rsplit(maxsplit=1)
                where = f'{ann_file}, line {number}'
                if len(parts) != 2:
                    raise ValueError(f'{where}: expected "<image path> <label>", '
                                     f'got {line!r}')
                name, label_text = parts
                try:
                    label = int(label_text)
                except ValueError:
                    raise ValueError(f'{where}: label {label_text!r} is not an '
                                     f'integer (line {line!r})') from None
                if label < 0 or (classes is not None and label >= len(classes)):
                    bound = (f' (there are {len(classes)} classes: labels 0..'
                             f'{len(classes) - 1})' if classes is not None else '')
                    raise ValueError(f'{where}: invalid label {label}{bound}')
                path = osp.join(folder, name)
                directory, base = osp.split(path)
                if directory not in listings:
                    listings[directory] = (set(os.listdir(directory))
                                           if osp.isdir(directory) else set())
                if base not in listings[directory]:
                    missing.append(f'line {number}: {path}')
                samples.append((path, label))
        if missing:
            shown = '; '.join(missing[:5])
            more = f' (and {len(missing) - 5} more)' if len(missing) > 5 else ''
            raise FileNotFoundError(
                f'{ann_file}: {len(missing)} listed images do not exist: '
                f'{shown}{more}')
        if not samples:
            raise ValueError(f'{ann_file} lists no images')
        if classes is None:
            classes = tuple(str(i) for i in range(max(s[1] for s in samples) + 1))
        return samples, classes

    def _scan_folders(self, folder: str, given: Optional[Sequence[str]]
                      ) -> Tuple[List[Tuple[str, int]], Tuple[str, ...]]:
        found = self._sub_folders(folder)
        if not found:
            raise ValueError(
                f'no class sub-folders in {folder}: expected <class>/<image> '
                f'folders, or a list file (ann_file, e.g. meta/<split>.txt)')
        if given is not None:
            absent = [c for c in given if c not in found]
            if absent:
                raise FileNotFoundError(
                    f'class folders missing in {folder}: {absent[:5]}'
                    + (f' (and {len(absent) - 5} more)' if len(absent) > 5 else ''))
            classes = tuple(given)
        else:
            classes = tuple(found)
        samples: List[Tuple[str, int]] = []
        empty = []
        for label, name in enumerate(classes):
            class_dir = osp.join(folder, name)
            images = []
            for root, dirs, files in os.walk(class_dir, followlinks=True):
                dirs.sort()
                images += [osp.join(root, f) for f in sorted(files)
                           if f.lower().endswith(self.extensions)]
            if not images:
                empty.append(class_dir)
            samples += [(path, label) for path in images]
        if empty:
            raise ValueError(
                f'{len(empty)} class folders hold no images (extensions '
                f'{", ".join(self.extensions)}): {", ".join(empty[:5])}')
        return samples, classes
