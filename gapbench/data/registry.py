"""What each dataset is: file names, counts, shapes, checksums and mirrors.

Every loader reads its expectations from :data:`SPECS` at call time, so a test
can swap in a spec for tiny files (``monkeypatch.setitem(SPECS, "mnist", ...)``)
and exercise the very code that reads the real ones.

Checksums. ``sha256`` is that of the file exactly as the canonical mirror
serves it; a *download* must match it before it is used. ``payload_sha256`` is
that of the content a loader reads (the decompressed IDX bytes, or the CIFAR
pickle file itself); a file *found* on disk is checked by structure and by this
digest, so a recompressed copy (Debian's ``dataset-fashion-mnist`` gzips its
files again) is still recognised. ``None`` means "not known": the file is then
checked by its structure only (magic numbers, header sizes, exact payload
length, array shapes).

Sources of the digests: MNIST, Fashion-MNIST and CIFAR-10 archive SHA-256s
agree across several public pinned-download lists (tensorflow-datasets style
checksum tables), and match torchvision's MD5s. The Fashion-MNIST payload
digests were computed from Debian's files and agree with published ones.
The Omniglot ``chardata.mat`` SHA-256 could not be found; only an MD5 from one
public loader is known, so a download is checked with that MD5 and the file's
structure.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from gapbench.data.errors import DataError


@dataclass(frozen=True)
class FileSpec:
    """One file of a dataset and what it must hash to (``None``: unknown)."""

    name: str
    sha256: Optional[str] = None  # of the file as downloaded
    payload_sha256: Optional[str] = None  # of what the loader reads (decompressed / the file itself)
    md5: Optional[str] = None  # used for downloads only where no SHA-256 is known


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset must look like and where it comes from.

    ``files`` are what a loader looks for on disk; ``downloads`` are what
    :func:`gapbench.data.download_dataset` fetches from ``mirrors`` (base URLs,
    tried in order; a file's URL is ``base + file name``).
    """

    name: str
    image_shape: Tuple[int, int, int]
    num_train: int  # size of the standard training set (digits: the whole set)
    num_test: int
    num_valid: int  # default validation size, carved from the training set
    num_classes: int
    files: Tuple[FileSpec, ...] = ()
    downloads: Tuple[FileSpec, ...] = ()
    mirrors: Tuple[str, ...] = ()
    torchvision_dir: Optional[str] = None  # <root>/<this>/ in torchvision's layout
    system_dirs: Tuple[str, ...] = ()  # installed by an OS package
    apt_package: Optional[str] = None
    archive_dir: Optional[str] = None  # folder inside an archive download (CIFAR)
    class_names: Tuple[str, ...] = ()  # by label, where the labels name something other than themselves


def class_name(dataset: Optional[str], label: int) -> str:
    """'T-shirt/top' for Fashion-MNIST's label 0; '' where the dataset's labels are their own names."""
    spec = SPECS.get(dataset) if isinstance(dataset, str) else None
    names = spec.class_names if spec is not None else ()
    return names[label] if 0 <= label < len(names) else ""


IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _idx_files(sha256s: Tuple[str, ...], payloads: Tuple[str, ...], md5s: Tuple[str, ...]) -> Tuple[FileSpec, ...]:
    return tuple(FileSpec(n, s, p, m) for n, s, p, m in zip(IDX_FILES, sha256s, payloads, md5s))


_MNIST_FILES = _idx_files(
    (
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    ),
    (
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
    (
        "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "d53e105ee54ea40749a09fcbcd1e9432",
        "9fb629c4189551a2d022fa330f9573f3",
        "ec29112dd5afa0611ce80d1b7f02629c",
    ),
)

_FASHION_FILES = _idx_files(
    (
        "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    ),
    (
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    ),
    (
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "25c81989df183df01b3e8a0aad5dffbe",
        "bef4ecab320f06d8554ea6380940ec79",
        "bb300cfdad3c16e7a12a480ee83cd310",
    ),
)

_CIFAR_FILES = (
    FileSpec("data_batch_1", payload_sha256="54636561a3ce25bd3e19253c6b0d8538147b0ae398331ac4a2d86c6d987368cd"),
    FileSpec("data_batch_2", payload_sha256="766b2cef9fbc745cf056b3152224f7cf77163b330ea9a15f9392beb8b89bc5a8"),
    FileSpec("data_batch_3", payload_sha256="0f00d98ebfb30b3ec0ad19f9756dc2630b89003e10525f5e148445e82aa6a1f9"),
    FileSpec("data_batch_4", payload_sha256="3f7bb240661948b8f4d53e36ec720d8306f5668bd0071dcb4e6c947f78e9682b"),
    FileSpec("data_batch_5", payload_sha256="d91802434d8376bbaeeadf58a737e3a1b12ac839077e931237e0dcd43adcb154"),
    FileSpec("test_batch", payload_sha256="f53d8d457504f7cff4ea9e021afcf0e0ad8e24a91f3fc42091b8adef61157831"),
    FileSpec("batches.meta", payload_sha256="f962466ef690d46b226450fb9aadc74ba4bc64a76aa526b5827fe4bc5c7125cb"),
)

CIFAR_ARCHIVE = "cifar-10-python.tar.gz"

SPECS: Dict[str, DatasetSpec] = {
    "digits": DatasetSpec("digits", (1, 8, 8), num_train=1797, num_test=300, num_valid=300, num_classes=10),
    "mnist": DatasetSpec(
        "mnist", (1, 28, 28), num_train=60_000, num_test=10_000, num_valid=10_000, num_classes=10,
        files=_MNIST_FILES, downloads=_MNIST_FILES,
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        torchvision_dir="MNIST",
    ),
    "fashion-mnist": DatasetSpec(
        "fashion-mnist", (1, 28, 28), num_train=60_000, num_test=10_000, num_valid=10_000, num_classes=10,
        files=_FASHION_FILES, downloads=_FASHION_FILES,
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        torchvision_dir="FashionMNIST",
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        apt_package="dataset-fashion-mnist",
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                     "Ankle boot"),
    ),
    "cifar10": DatasetSpec(
        "cifar10", (3, 32, 32), num_train=50_000, num_test=10_000, num_valid=5_000, num_classes=10,
        files=_CIFAR_FILES,
        downloads=(
            FileSpec(
                CIFAR_ARCHIVE,
                sha256="6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
                md5="c58f30108f718f92721af3b95e74349a",
            ),
        ),
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        archive_dir="cifar-10-batches-py",
        class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    ),
    "omniglot": DatasetSpec(
        "omniglot", (1, 28, 28), num_train=24_345, num_test=8_070, num_valid=2_000, num_classes=50,
        # No SHA-256 of chardata.mat is known (None: structure-checked); the MD5 is from one public loader.
        files=(FileSpec("chardata.mat"),),
        downloads=(FileSpec("chardata.mat", sha256=None, md5="21ecaf34373511aa7691cf2e0802aa3d"),),
        mirrors=("https://raw.githubusercontent.com/yburda/iwae/master/datasets/OMNIGLOT/",),
    ),
}

DATASETS: Tuple[str, ...] = tuple(SPECS)


def get_spec(name: str) -> DatasetSpec:
    """The spec of dataset ``name``; an unknown name is a DataError naming the closest valid one."""
    if not isinstance(name, str) or name not in SPECS:
        close = difflib.get_close_matches(str(name).lower(), list(SPECS), n=1, cutoff=0.4)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise DataError(f"unknown dataset {name!r}: {hint}valid names are {', '.join(SPECS)}")
    return SPECS[name]
