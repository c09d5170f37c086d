import pytest
from tiny_llava import make_hf_llava


@pytest.fixture
def hf_llava_dir(tmp_path):
    """A saved tiny random llava-hf directory and the transformers model it came from."""
    model = make_hf_llava()
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", model
