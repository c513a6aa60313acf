from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Budget(_message.Message):
    __slots__ = ("kind", "value", "milliseconds", "latency_table", "memory_bytes")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Budget.Kind]
        PARAMS: _ClassVar[Budget.Kind]
        MACS: _ClassVar[Budget.Kind]
        LATENCY: _ClassVar[Budget.Kind]
        MEMORY: _ClassVar[Budget.Kind]
    KIND_UNSPECIFIED: Budget.Kind
    PARAMS: Budget.Kind
    MACS: Budget.Kind
    LATENCY: Budget.Kind
    MEMORY: Budget.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    MILLISECONDS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_TABLE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    kind: Budget.Kind
    value: float
    milliseconds: float
    latency_table: LatencyTable
    memory_bytes: float
    def __init__(self, kind: _Optional[_Union[Budget.Kind, str]] = ..., value: _Optional[float] = ..., milliseconds: _Optional[float] = ..., latency_table: _Optional[_Union[LatencyTable, _Mapping]] = ..., memory_bytes: _Optional[float] = ...) -> None: ...

class LatencyLayer(_message.Message):
    __slots__ = ("name", "cin", "cout", "us")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CIN_FIELD_NUMBER: _ClassVar[int]
    COUT_FIELD_NUMBER: _ClassVar[int]
    US_FIELD_NUMBER: _ClassVar[int]
    name: str
    cin: _containers.RepeatedScalarFieldContainer[int]
    cout: _containers.RepeatedScalarFieldContainer[int]
    us: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, name: _Optional[str] = ..., cin: _Optional[_Iterable[int]] = ..., cout: _Optional[_Iterable[int]] = ..., us: _Optional[_Iterable[float]] = ...) -> None: ...

class LatencyPoint(_message.Message):
    __slots__ = ("sum_ms", "measured_ms")
    SUM_MS_FIELD_NUMBER: _ClassVar[int]
    MEASURED_MS_FIELD_NUMBER: _ClassVar[int]
    sum_ms: float
    measured_ms: float
    def __init__(self, sum_ms: _Optional[float] = ..., measured_ms: _Optional[float] = ...) -> None: ...

class LatencyTable(_message.Message):
    __slots__ = ("format", "base_model_sha256", "tasks", "input_size", "runtime", "threads", "round_to", "dense_ms", "calibration", "layers")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    ROUND_TO_FIELD_NUMBER: _ClassVar[int]
    DENSE_MS_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    format: str
    base_model_sha256: str
    tasks: _containers.RepeatedScalarFieldContainer[str]
    input_size: _containers.RepeatedScalarFieldContainer[int]
    runtime: str
    threads: int
    round_to: int
    dense_ms: float
    calibration: _containers.RepeatedCompositeFieldContainer[LatencyPoint]
    layers: _containers.RepeatedCompositeFieldContainer[LatencyLayer]
    def __init__(self, format: _Optional[str] = ..., base_model_sha256: _Optional[str] = ..., tasks: _Optional[_Iterable[str]] = ..., input_size: _Optional[_Iterable[int]] = ..., runtime: _Optional[str] = ..., threads: _Optional[int] = ..., round_to: _Optional[int] = ..., dense_ms: _Optional[float] = ..., calibration: _Optional[_Iterable[_Union[LatencyPoint, _Mapping]]] = ..., layers: _Optional[_Iterable[_Union[LatencyLayer, _Mapping]]] = ...) -> None: ...

class TaskProfile(_message.Message):
    __slots__ = ("protocol_version", "device_id", "tasks", "task_priority", "budget", "device_class", "samples_per_task")
    class TaskPriorityEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class SamplesPerTaskEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    TASK_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    DEVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_TASK_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    device_id: str
    tasks: _containers.RepeatedScalarFieldContainer[str]
    task_priority: _containers.ScalarMap[str, float]
    budget: Budget
    device_class: str
    samples_per_task: _containers.ScalarMap[str, int]
    def __init__(self, protocol_version: _Optional[int] = ..., device_id: _Optional[str] = ..., tasks: _Optional[_Iterable[str]] = ..., task_priority: _Optional[_Mapping[str, float]] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ..., device_class: _Optional[str] = ..., samples_per_task: _Optional[_Mapping[str, int]] = ...) -> None: ...

class PrivacySettings(_message.Message):
    __slots__ = ("clip_norm", "noise_multiplier")
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    clip_norm: float
    noise_multiplier: float
    def __init__(self, clip_norm: _Optional[float] = ..., noise_multiplier: _Optional[float] = ...) -> None: ...

class ScoringRequest(_message.Message):
    __slots__ = ("protocol_version", "base_model_id", "base_model_sha256", "tasks", "criterion", "num_batches", "batch_size", "privacy")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    CRITERION_FIELD_NUMBER: _ClassVar[int]
    NUM_BATCHES_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    base_model_id: str
    base_model_sha256: str
    tasks: _containers.RepeatedScalarFieldContainer[str]
    criterion: str
    num_batches: int
    batch_size: int
    privacy: PrivacySettings
    def __init__(self, protocol_version: _Optional[int] = ..., base_model_id: _Optional[str] = ..., base_model_sha256: _Optional[str] = ..., tasks: _Optional[_Iterable[str]] = ..., criterion: _Optional[str] = ..., num_batches: _Optional[int] = ..., batch_size: _Optional[int] = ..., privacy: _Optional[_Union[PrivacySettings, _Mapping]] = ...) -> None: ...

class TaskScores(_message.Message):
    __slots__ = ("task", "samples_used", "group_names")
    TASK_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_USED_FIELD_NUMBER: _ClassVar[int]
    GROUP_NAMES_FIELD_NUMBER: _ClassVar[int]
    task: str
    samples_used: int
    group_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, task: _Optional[str] = ..., samples_used: _Optional[int] = ..., group_names: _Optional[_Iterable[str]] = ...) -> None: ...

class ImportanceReport(_message.Message):
    __slots__ = ("protocol_version", "device_id", "base_model_id", "base_model_sha256", "tasks", "dtype")
    class Dtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DTYPE_UNSPECIFIED: _ClassVar[ImportanceReport.Dtype]
        FLOAT16: _ClassVar[ImportanceReport.Dtype]
        FLOAT32: _ClassVar[ImportanceReport.Dtype]
    DTYPE_UNSPECIFIED: ImportanceReport.Dtype
    FLOAT16: ImportanceReport.Dtype
    FLOAT32: ImportanceReport.Dtype
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    device_id: str
    base_model_id: str
    base_model_sha256: str
    tasks: _containers.RepeatedCompositeFieldContainer[TaskScores]
    dtype: ImportanceReport.Dtype
    def __init__(self, protocol_version: _Optional[int] = ..., device_id: _Optional[str] = ..., base_model_id: _Optional[str] = ..., base_model_sha256: _Optional[str] = ..., tasks: _Optional[_Iterable[_Union[TaskScores, _Mapping]]] = ..., dtype: _Optional[_Union[ImportanceReport.Dtype, str]] = ...) -> None: ...

class GroupKeep(_message.Message):
    __slots__ = ("name", "size", "keep")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    keep: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., keep: _Optional[_Iterable[int]] = ...) -> None: ...

class PruningPlan(_message.Message):
    __slots__ = ("protocol_version", "base_model_sha256", "tasks", "groups", "budget_kind", "budget_value", "method", "achieved", "plan_hash", "plan_format_version")
    class AchievedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_KIND_FIELD_NUMBER: _ClassVar[int]
    BUDGET_VALUE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ACHIEVED_FIELD_NUMBER: _ClassVar[int]
    PLAN_HASH_FIELD_NUMBER: _ClassVar[int]
    PLAN_FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    base_model_sha256: str
    tasks: _containers.RepeatedScalarFieldContainer[str]
    groups: _containers.RepeatedCompositeFieldContainer[GroupKeep]
    budget_kind: Budget.Kind
    budget_value: float
    method: str
    achieved: _containers.ScalarMap[str, float]
    plan_hash: str
    plan_format_version: int
    def __init__(self, protocol_version: _Optional[int] = ..., base_model_sha256: _Optional[str] = ..., tasks: _Optional[_Iterable[str]] = ..., groups: _Optional[_Iterable[_Union[GroupKeep, _Mapping]]] = ..., budget_kind: _Optional[_Union[Budget.Kind, str]] = ..., budget_value: _Optional[float] = ..., method: _Optional[str] = ..., achieved: _Optional[_Mapping[str, float]] = ..., plan_hash: _Optional[str] = ..., plan_format_version: _Optional[int] = ...) -> None: ...

class CompactModelSpec(_message.Message):
    __slots__ = ("protocol_version", "plan", "architecture_json", "weights_sha256", "expected_metrics", "tasks")
    class ExpectedMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_JSON_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_METRICS_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    plan: PruningPlan
    architecture_json: str
    weights_sha256: str
    expected_metrics: _containers.ScalarMap[str, float]
    tasks: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, protocol_version: _Optional[int] = ..., plan: _Optional[_Union[PruningPlan, _Mapping]] = ..., architecture_json: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., expected_metrics: _Optional[_Mapping[str, float]] = ..., tasks: _Optional[_Iterable[str]] = ...) -> None: ...
