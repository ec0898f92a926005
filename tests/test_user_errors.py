"""What a user can get wrong about where the model and data are becomes a UserError naming
the value; only the failures that mean that are caught (a programming error still raises)."""
from __future__ import annotations

import pytest

from trainers.errors import UserError


def test_unreachable_hub_model_and_malformed_id_name_the_path(monkeypatch):
    from trainers.model.load import local_model_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network here: the hub is unreachable
    with pytest.raises(UserError, match=r"model.path='nobody/no-such-model' is neither a local directory"):
        local_model_dir("nobody/no-such-model")
    with pytest.raises(UserError, match=r"model.path='a/b/c' is neither a local directory"):
        local_model_dir("a/b/c")  # not a valid repo id (huggingface_hub's HFValidationError)


def test_a_folder_that_is_not_a_saved_dataset_names_the_folder(tmp_path):
    from trainers.data.rows import _read_datasets_folder

    (tmp_path / "dataset_info.json").write_text("{not json")
    with pytest.raises(UserError, match=f"Could not load the datasets folder '{tmp_path}'"):
        next(_read_datasets_folder(tmp_path, 8))
