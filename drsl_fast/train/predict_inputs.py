"""The images ``drsl predict`` reads: files, folders (searched recursively)
and glob patterns, each with the name its outputs get. A folder or a pattern
contributes the files with an image extension; a file named on the command
line is taken as it is (an unreadable one is reported when it is read)."""
import glob
import os
from typing import Dict, List, NamedTuple, Sequence

from .schema import ConfigError, shown

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class InputImage(NamedTuple):
    path: str
    name: str   # output name without extension; a folder's images keep their relative path


def is_image_name(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def folder_images(folder: str) -> List[InputImage]:
    found = []
    for root, directories, files in os.walk(folder):
        directories.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            if is_image_name(name):
                found.append(InputImage(path, os.path.splitext(os.path.relpath(path, folder))[0]))
    return found


def file_image(path: str) -> InputImage:
    return InputImage(path, os.path.splitext(os.path.basename(path))[0])


def expand(argument: str) -> List[InputImage]:
    """The images of one INPUT argument; raises ConfigError when it names nothing."""
    if os.path.isdir(argument):
        return folder_images(argument)
    if os.path.isfile(argument):
        return [file_image(argument)]
    if glob.has_magic(argument):
        found = []
        for match in sorted(glob.glob(argument, recursive=True)):
            if os.path.isdir(match):
                found += folder_images(match)
            elif is_image_name(match):
                found.append(file_image(match))
        return found
    raise ConfigError(f"INPUT: expected an image file, a folder or a glob pattern, got {shown(argument)} "
                      f"(no such file or folder)")


def find_images(arguments: Sequence[str]) -> List[InputImage]:
    """Every image of ``arguments``, each file once, in the order given;
    ConfigError when there are none or two would write the same outputs."""
    images: List[InputImage] = []
    seen: Dict[str, str] = {}   # real path -> path
    names: Dict[str, str] = {}  # output name -> path
    for argument in arguments:
        for image in expand(argument):
            real = os.path.realpath(image.path)
            if real in seen:
                continue
            if image.name in names:
                raise ConfigError(f"INPUT: {shown(names[image.name])} and {shown(image.path)} would both be written "
                                  f"as {shown(image.name)}; predict them in two runs or rename one")
            seen[real], names[image.name] = image.path, image.path
            images.append(image)
    if not images:
        raise ConfigError(f"INPUT: no images ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(map(shown, arguments))}")
    return images
