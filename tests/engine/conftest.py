import pytest

from tests.utils import save_tiny_hf_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_hf_model(path, num_hidden_layers=2, max_position_embeddings=512)
    return str(path)
