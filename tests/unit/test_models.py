"""The typed keyword arguments of the DAO methods are their models' fields, no more, no less."""

from __future__ import annotations

from typing import get_type_hints

import pytest
from pydantic import BaseModel

from keen_stream.dal.models.sessions import (
    SessionCompletion,
    SessionCompletionFields,
    SessionCreate,
    SessionCreateFields,
)
from keen_stream.dal.models.users import (
    UserCreate,
    UserCreateFields,
    UserProfileFields,
    UserProfileUpdate,
)
from keen_stream.dal.validation import build
from keen_stream.errors import InvalidInput


@pytest.mark.parametrize(
    ("fields", "model"),
    [
        (UserCreateFields, UserCreate),
        (UserProfileFields, UserProfileUpdate),
        (SessionCreateFields, SessionCreate),
        (SessionCompletionFields, SessionCompletion),
    ],
    ids=lambda x: x.__name__,
)
def test_each_fields_dict_names_exactly_its_models_fields(
    fields: type, model: type[BaseModel]
) -> None:
    assert set(get_type_hints(fields)) == set(model.model_fields)


def test_a_model_and_fields_together_are_refused() -> None:
    data = SessionCreate(session_handle="s", vision="v", working_directory="/w", git_branch="m")
    with pytest.raises(InvalidInput, match="not both"):
        build(SessionCreate, data, vision="other")
