import pytest
from PIL import Image


@pytest.fixture(scope="session")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "cat.png"
    Image.new("RGB", (40, 24), (200, 30, 90)).save(path)
    return path
