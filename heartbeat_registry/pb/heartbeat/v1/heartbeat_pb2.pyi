from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATUS_UNSPECIFIED: _ClassVar[Status]
    IDLE: _ClassVar[Status]
    RUNNING: _ClassVar[Status]
    COMPLETED: _ClassVar[Status]
    FAILED: _ClassVar[Status]
    STOPPING: _ClassVar[Status]

class EventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_TYPE_UNSPECIFIED: _ClassVar[EventType]
    STALL: _ClassVar[EventType]
    RECOVERY: _ClassVar[EventType]
    PIPELINE_LAG: _ClassVar[EventType]
    PIPELINE_CAUGHT_UP: _ClassVar[EventType]
    MASS_SILENCE: _ClassVar[EventType]
    MASS_SILENCE_CLEARED: _ClassVar[EventType]
    ASSIGNMENT_EXPIRED: _ClassVar[EventType]

class TaskState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_STATE_UNSPECIFIED: _ClassVar[TaskState]
    TASK_RUNNING: _ClassVar[TaskState]
    TASK_ORPHANED: _ClassVar[TaskState]
    TASK_ASSIGNED: _ClassVar[TaskState]
STATUS_UNSPECIFIED: Status
IDLE: Status
RUNNING: Status
COMPLETED: Status
FAILED: Status
STOPPING: Status
EVENT_TYPE_UNSPECIFIED: EventType
STALL: EventType
RECOVERY: EventType
PIPELINE_LAG: EventType
PIPELINE_CAUGHT_UP: EventType
MASS_SILENCE: EventType
MASS_SILENCE_CLEARED: EventType
ASSIGNMENT_EXPIRED: EventType
TASK_STATE_UNSPECIFIED: TaskState
TASK_RUNNING: TaskState
TASK_ORPHANED: TaskState
TASK_ASSIGNED: TaskState

class Heartbeat(_message.Message):
    __slots__ = ("agent_id", "task_id", "status", "timestamp", "cpu_util", "progress", "seq")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    CPU_UTIL_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    task_id: str
    status: Status
    timestamp: int
    cpu_util: float
    progress: float
    seq: int
    def __init__(self, agent_id: _Optional[str] = ..., task_id: _Optional[str] = ..., status: _Optional[_Union[Status, str]] = ..., timestamp: _Optional[int] = ..., cpu_util: _Optional[float] = ..., progress: _Optional[float] = ..., seq: _Optional[int] = ...) -> None: ...

class Directive(_message.Message):
    __slots__ = ("kind", "agent_id", "task_id", "epoch", "reason")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Directive.Kind]
        ABANDON: _ClassVar[Directive.Kind]
        ASSIGN: _ClassVar[Directive.Kind]
    KIND_UNSPECIFIED: Directive.Kind
    ABANDON: Directive.Kind
    ASSIGN: Directive.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    kind: Directive.Kind
    agent_id: str
    task_id: str
    epoch: int
    reason: str
    def __init__(self, kind: _Optional[_Union[Directive.Kind, str]] = ..., agent_id: _Optional[str] = ..., task_id: _Optional[str] = ..., epoch: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class BeatReply(_message.Message):
    __slots__ = ("seq", "received_ms", "directives")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_MS_FIELD_NUMBER: _ClassVar[int]
    DIRECTIVES_FIELD_NUMBER: _ClassVar[int]
    seq: int
    received_ms: int
    directives: _containers.RepeatedCompositeFieldContainer[Directive]
    def __init__(self, seq: _Optional[int] = ..., received_ms: _Optional[int] = ..., directives: _Optional[_Iterable[_Union[Directive, _Mapping]]] = ...) -> None: ...

class BeatBatchRequest(_message.Message):
    __slots__ = ("heartbeats",)
    HEARTBEATS_FIELD_NUMBER: _ClassVar[int]
    heartbeats: _containers.RepeatedCompositeFieldContainer[Heartbeat]
    def __init__(self, heartbeats: _Optional[_Iterable[_Union[Heartbeat, _Mapping]]] = ...) -> None: ...

class BeatBatchReply(_message.Message):
    __slots__ = ("received_ms", "accepted", "directives")
    RECEIVED_MS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DIRECTIVES_FIELD_NUMBER: _ClassVar[int]
    received_ms: int
    accepted: int
    directives: _containers.RepeatedCompositeFieldContainer[Directive]
    def __init__(self, received_ms: _Optional[int] = ..., accepted: _Optional[int] = ..., directives: _Optional[_Iterable[_Union[Directive, _Mapping]]] = ...) -> None: ...

class HeartbeatColumns(_message.Message):
    __slots__ = ("agent_id", "task_id", "status", "timestamp", "cpu_util", "progress", "received_ms", "watermark_ms", "seq")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    CPU_UTIL_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_MS_FIELD_NUMBER: _ClassVar[int]
    WATERMARK_MS_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    agent_id: _containers.RepeatedScalarFieldContainer[str]
    task_id: _containers.RepeatedScalarFieldContainer[str]
    status: _containers.RepeatedScalarFieldContainer[Status]
    timestamp: _containers.RepeatedScalarFieldContainer[int]
    cpu_util: _containers.RepeatedScalarFieldContainer[float]
    progress: _containers.RepeatedScalarFieldContainer[float]
    received_ms: _containers.RepeatedScalarFieldContainer[int]
    watermark_ms: int
    seq: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, agent_id: _Optional[_Iterable[str]] = ..., task_id: _Optional[_Iterable[str]] = ..., status: _Optional[_Iterable[_Union[Status, str]]] = ..., timestamp: _Optional[_Iterable[int]] = ..., cpu_util: _Optional[_Iterable[float]] = ..., progress: _Optional[_Iterable[float]] = ..., received_ms: _Optional[_Iterable[int]] = ..., watermark_ms: _Optional[int] = ..., seq: _Optional[_Iterable[int]] = ...) -> None: ...

class AgentEvent(_message.Message):
    __slots__ = ("type", "agent_id", "task_id", "reason", "last_seen_ms", "detected_at_ms", "event_id", "partition", "figures", "agent_ids", "emitted_at_ms")
    class FiguresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TYPE_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_MS_FIELD_NUMBER: _ClassVar[int]
    DETECTED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    FIGURES_FIELD_NUMBER: _ClassVar[int]
    AGENT_IDS_FIELD_NUMBER: _ClassVar[int]
    EMITTED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    type: EventType
    agent_id: str
    task_id: str
    reason: str
    last_seen_ms: int
    detected_at_ms: int
    event_id: str
    partition: int
    figures: _containers.ScalarMap[str, float]
    agent_ids: _containers.RepeatedScalarFieldContainer[str]
    emitted_at_ms: int
    def __init__(self, type: _Optional[_Union[EventType, str]] = ..., agent_id: _Optional[str] = ..., task_id: _Optional[str] = ..., reason: _Optional[str] = ..., last_seen_ms: _Optional[int] = ..., detected_at_ms: _Optional[int] = ..., event_id: _Optional[str] = ..., partition: _Optional[int] = ..., figures: _Optional[_Mapping[str, float]] = ..., agent_ids: _Optional[_Iterable[str]] = ..., emitted_at_ms: _Optional[int] = ...) -> None: ...

class Reassignment(_message.Message):
    __slots__ = ("task_id", "from_agent_id", "epoch", "reason", "stall_event_id", "detected_at_ms", "emitted_at_ms")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    STALL_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    DETECTED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    EMITTED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    from_agent_id: str
    epoch: int
    reason: str
    stall_event_id: str
    detected_at_ms: int
    emitted_at_ms: int
    def __init__(self, task_id: _Optional[str] = ..., from_agent_id: _Optional[str] = ..., epoch: _Optional[int] = ..., reason: _Optional[str] = ..., stall_event_id: _Optional[str] = ..., detected_at_ms: _Optional[int] = ..., emitted_at_ms: _Optional[int] = ...) -> None: ...

class TaskChange(_message.Message):
    __slots__ = ("epoch", "agent_id", "what", "at_ms", "why")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    WHAT_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    WHY_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    agent_id: str
    what: str
    at_ms: int
    why: str
    def __init__(self, epoch: _Optional[int] = ..., agent_id: _Optional[str] = ..., what: _Optional[str] = ..., at_ms: _Optional[int] = ..., why: _Optional[str] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("task_id", "owner", "epoch", "state", "since_ms", "history", "assign_deadline_ms")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SINCE_MS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    ASSIGN_DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    owner: str
    epoch: int
    state: TaskState
    since_ms: int
    history: _containers.RepeatedCompositeFieldContainer[TaskChange]
    assign_deadline_ms: int
    def __init__(self, task_id: _Optional[str] = ..., owner: _Optional[str] = ..., epoch: _Optional[int] = ..., state: _Optional[_Union[TaskState, str]] = ..., since_ms: _Optional[int] = ..., history: _Optional[_Iterable[_Union[TaskChange, _Mapping]]] = ..., assign_deadline_ms: _Optional[int] = ...) -> None: ...

class AssignRequest(_message.Message):
    __slots__ = ("task_id", "agent_id", "epoch")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    agent_id: str
    epoch: int
    def __init__(self, task_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ("state", "limit")
    STATE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    state: TaskState
    limit: int
    def __init__(self, state: _Optional[_Union[TaskState, str]] = ..., limit: _Optional[int] = ...) -> None: ...

class ListTasksReply(_message.Message):
    __slots__ = ("tasks",)
    TASKS_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[Task]
    def __init__(self, tasks: _Optional[_Iterable[_Union[Task, _Mapping]]] = ...) -> None: ...
