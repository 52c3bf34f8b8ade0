import os.path as osp

from setuptools import find_packages, setup


def read_version() -> str:
    namespace = {}
    with open(osp.join(osp.dirname(__file__), 'cenet_mmdet', 'version.py')) as f:
        exec(f.read(), namespace)
    return namespace['__version__']


setup(
    name='cenet-mmdet',
    version=read_version(),
    description='Channel Equilibrium (CE) layers and CE-ResNet backbones for '
    'MMDetection',
    packages=find_packages(include=['cenet_mmdet', 'cenet_mmdet.*']),
    license='Apache-2.0',
    python_requires='>=3.11',   # tested: Python 3.11 (docs/installation.md)
    install_requires=[
        'torch>=1.13',
        'mmengine>=0.10.0,<0.11.0',
        'mmcv>=2.0.0,<2.2.0',
        'mmdet>=3.0.0,<4.0.0',
        'pycocotools',
    ],
    extras_require={'tests': ['pytest']},
    zip_safe=False,
)
