from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LayoutDescriptor(_message.Message):
    __slots__ = ("protocol_version", "model_id", "dtype", "num_layers", "num_kv_heads", "head_dim", "block_size", "cache_layout", "tensor_parallel_size")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    CACHE_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    model_id: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    cache_layout: str
    tensor_parallel_size: int
    def __init__(self, protocol_version: _Optional[int] = ..., model_id: _Optional[str] = ..., dtype: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., block_size: _Optional[int] = ..., cache_layout: _Optional[str] = ..., tensor_parallel_size: _Optional[int] = ...) -> None: ...

class KvDestination(_message.Message):
    __slots__ = ("worker_id", "epoch", "reservation_id", "block_ids", "transport", "transfer_address", "layout", "lease_expires_unix_ms")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    epoch: int
    reservation_id: str
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    transport: str
    transfer_address: str
    layout: LayoutDescriptor
    lease_expires_unix_ms: int
    def __init__(self, worker_id: _Optional[str] = ..., epoch: _Optional[int] = ..., reservation_id: _Optional[str] = ..., block_ids: _Optional[_Iterable[int]] = ..., transport: _Optional[str] = ..., transfer_address: _Optional[str] = ..., layout: _Optional[_Union[LayoutDescriptor, _Mapping]] = ..., lease_expires_unix_ms: _Optional[int] = ...) -> None: ...

class KvTransferHeader(_message.Message):
    __slots__ = ("request_id", "destination", "layout", "src_worker_id", "block_indices", "layer_start", "layer_end", "block_checksums", "checksum_algorithm", "payload_bytes", "last")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    SRC_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_INDICES_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    BLOCK_CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    destination: KvDestination
    layout: LayoutDescriptor
    src_worker_id: str
    block_indices: _containers.RepeatedScalarFieldContainer[int]
    layer_start: int
    layer_end: int
    block_checksums: _containers.RepeatedScalarFieldContainer[int]
    checksum_algorithm: str
    payload_bytes: int
    last: bool
    def __init__(self, request_id: _Optional[str] = ..., destination: _Optional[_Union[KvDestination, _Mapping]] = ..., layout: _Optional[_Union[LayoutDescriptor, _Mapping]] = ..., src_worker_id: _Optional[str] = ..., block_indices: _Optional[_Iterable[int]] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., block_checksums: _Optional[_Iterable[int]] = ..., checksum_algorithm: _Optional[str] = ..., payload_bytes: _Optional[int] = ..., last: bool = ...) -> None: ...

class KvTransferAck(_message.Message):
    __slots__ = ("ok", "error", "code")
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    error: str
    code: str
    def __init__(self, ok: bool = ..., error: _Optional[str] = ..., code: _Optional[str] = ...) -> None: ...

class KvPeerInfo(_message.Message):
    __slots__ = ("worker_id", "host_id", "device_type", "device_index", "device_uuid", "layout")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_TYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_INDEX_FIELD_NUMBER: _ClassVar[int]
    DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    host_id: str
    device_type: str
    device_index: int
    device_uuid: str
    layout: LayoutDescriptor
    def __init__(self, worker_id: _Optional[str] = ..., host_id: _Optional[str] = ..., device_type: _Optional[str] = ..., device_index: _Optional[int] = ..., device_uuid: _Optional[str] = ..., layout: _Optional[_Union[LayoutDescriptor, _Mapping]] = ...) -> None: ...

class KvHello(_message.Message):
    __slots__ = ("peer", "transport")
    PEER_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    peer: KvPeerInfo
    transport: str
    def __init__(self, peer: _Optional[_Union[KvPeerInfo, _Mapping]] = ..., transport: _Optional[str] = ...) -> None: ...

class CudaIpcExport(_message.Message):
    __slots__ = ("handle", "storage_size_bytes", "storage_offset_bytes", "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required", "shape", "stride", "storage_offset", "dtype", "device_index")
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    STORAGE_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORAGE_OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_HANDLE_FIELD_NUMBER: _ClassVar[int]
    REF_COUNTER_OFFSET_FIELD_NUMBER: _ClassVar[int]
    EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    EVENT_SYNC_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    STORAGE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_INDEX_FIELD_NUMBER: _ClassVar[int]
    handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    shape: _containers.RepeatedScalarFieldContainer[int]
    stride: _containers.RepeatedScalarFieldContainer[int]
    storage_offset: int
    dtype: str
    device_index: int
    def __init__(self, handle: _Optional[bytes] = ..., storage_size_bytes: _Optional[int] = ..., storage_offset_bytes: _Optional[int] = ..., ref_counter_handle: _Optional[bytes] = ..., ref_counter_offset: _Optional[int] = ..., event_handle: _Optional[bytes] = ..., event_sync_required: bool = ..., shape: _Optional[_Iterable[int]] = ..., stride: _Optional[_Iterable[int]] = ..., storage_offset: _Optional[int] = ..., dtype: _Optional[str] = ..., device_index: _Optional[int] = ...) -> None: ...

class NcclRendezvous(_message.Message):
    __slots__ = ("store_host", "store_port", "prefix", "backend", "staging_bytes", "sender_rank", "receiver_rank")
    STORE_HOST_FIELD_NUMBER: _ClassVar[int]
    STORE_PORT_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    STAGING_BYTES_FIELD_NUMBER: _ClassVar[int]
    SENDER_RANK_FIELD_NUMBER: _ClassVar[int]
    RECEIVER_RANK_FIELD_NUMBER: _ClassVar[int]
    store_host: str
    store_port: int
    prefix: str
    backend: str
    staging_bytes: int
    sender_rank: int
    receiver_rank: int
    def __init__(self, store_host: _Optional[str] = ..., store_port: _Optional[int] = ..., prefix: _Optional[str] = ..., backend: _Optional[str] = ..., staging_bytes: _Optional[int] = ..., sender_rank: _Optional[int] = ..., receiver_rank: _Optional[int] = ...) -> None: ...

class KvExport(_message.Message):
    __slots__ = ("ok", "error", "code", "peer", "transport", "cuda_ipc", "nccl")
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    CUDA_IPC_FIELD_NUMBER: _ClassVar[int]
    NCCL_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    error: str
    code: str
    peer: KvPeerInfo
    transport: str
    cuda_ipc: CudaIpcExport
    nccl: NcclRendezvous
    def __init__(self, ok: bool = ..., error: _Optional[str] = ..., code: _Optional[str] = ..., peer: _Optional[_Union[KvPeerInfo, _Mapping]] = ..., transport: _Optional[str] = ..., cuda_ipc: _Optional[_Union[CudaIpcExport, _Mapping]] = ..., nccl: _Optional[_Union[NcclRendezvous, _Mapping]] = ...) -> None: ...

class KvWriteGrant(_message.Message):
    __slots__ = ("granted", "final")
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    granted: bool
    final: KvTransferAck
    def __init__(self, granted: bool = ..., final: _Optional[_Union[KvTransferAck, _Mapping]] = ...) -> None: ...

class KvWriteDone(_message.Message):
    __slots__ = ("ok", "error")
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    error: str
    def __init__(self, ok: bool = ..., error: _Optional[str] = ...) -> None: ...
