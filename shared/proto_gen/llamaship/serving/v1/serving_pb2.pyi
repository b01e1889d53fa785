from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoadedBuild(_message.Message):
    __slots__ = ("model", "build_id", "recipe", "context_length", "max_batch")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BUILD_ID_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    model: str
    build_id: str
    recipe: str
    context_length: int
    max_batch: int
    def __init__(self, model: _Optional[str] = ..., build_id: _Optional[str] = ..., recipe: _Optional[str] = ..., context_length: _Optional[int] = ..., max_batch: _Optional[int] = ...) -> None: ...

class ReplicaStatus(_message.Message):
    __slots__ = ("replica_id", "pool", "slots", "active", "builds")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    BUILDS_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    pool: str
    slots: int
    active: int
    builds: _containers.RepeatedCompositeFieldContainer[LoadedBuild]
    def __init__(self, replica_id: _Optional[str] = ..., pool: _Optional[str] = ..., slots: _Optional[int] = ..., active: _Optional[int] = ..., builds: _Optional[_Iterable[_Union[LoadedBuild, _Mapping]]] = ...) -> None: ...
