"""The subset of Caffe's ``caffe.proto`` this project reads, declared in Python.

Field numbers and types follow Caffe's published schema, so protobuf's own binary
parser (``FromString``) and text-format parser (``text_format``) read real Caffe
files. Only messages and fields that matter for inference are declared; the binary
parser skips the rest (training fields, fillers, data layers) on its own, and the
text parser is told to skip unknown fields.

Two variants are built: ``packed=True`` (how Caffe writes float blobs) and
``packed=False`` (legacy unpacked floats, used by tests to write such files; the
parser reads both encodings either way).
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto
_TYPES = {
    "string": _F.TYPE_STRING, "float": _F.TYPE_FLOAT, "double": _F.TYPE_DOUBLE,
    "bool": _F.TYPE_BOOL, "int32": _F.TYPE_INT32, "int64": _F.TYPE_INT64,
    "uint32": _F.TYPE_UINT32, "uint64": _F.TYPE_UINT64,
}

# (message, [(label, type, name, number, default-or-None, packed)])
# label: "o" optional, "r" repeated. type: scalar name, ".caffe.Msg" or "enum:.caffe.Enum".
_ENUMS = {
    "Phase": [("TRAIN", 0), ("TEST", 1)],
    "PoolMethod": [("MAX", 0), ("AVE", 1), ("STOCHASTIC", 2)],
    "NormRegion": [("ACROSS_CHANNELS", 0), ("WITHIN_CHANNEL", 1)],
    "V1LayerType": [
        ("NONE", 0), ("ABSVAL", 35), ("ACCURACY", 1), ("ARGMAX", 30), ("BNLL", 2),
        ("CONCAT", 3), ("CONTRASTIVE_LOSS", 37), ("CONVOLUTION", 4), ("DATA", 5),
        ("DECONVOLUTION", 39), ("DROPOUT", 6), ("DUMMY_DATA", 32), ("EUCLIDEAN_LOSS", 7),
        ("ELTWISE", 25), ("EXP", 38), ("FLATTEN", 8), ("HDF5_DATA", 9), ("HDF5_OUTPUT", 10),
        ("HINGE_LOSS", 28), ("IM2COL", 11), ("IMAGE_DATA", 12), ("INFOGAIN_LOSS", 13),
        ("INNER_PRODUCT", 14), ("LRN", 15), ("MEMORY_DATA", 29),
        ("MULTINOMIAL_LOGISTIC_LOSS", 16), ("MVN", 34), ("POOLING", 17), ("POWER", 26),
        ("RELU", 18), ("SIGMOID", 19), ("SIGMOID_CROSS_ENTROPY_LOSS", 27), ("SILENCE", 36),
        ("SOFTMAX", 20), ("SOFTMAX_LOSS", 21), ("SPLIT", 22), ("SLICE", 33), ("TANH", 23),
        ("WINDOW_DATA", 24), ("THRESHOLD", 31),
    ],
}


def _messages(packed: bool) -> dict[str, list[tuple]]:
    return {
        "BlobShape": [("r", "int64", "dim", 1, None, True)],
        "BlobProto": [
            ("o", ".caffe.BlobShape", "shape", 7, None, False),
            ("r", "float", "data", 5, None, packed),
            ("r", "float", "diff", 6, None, packed),
            ("r", "double", "double_data", 8, None, packed),
            ("r", "double", "double_diff", 9, None, packed),
            ("o", "int32", "num", 1, "0", False),
            ("o", "int32", "channels", 2, "0", False),
            ("o", "int32", "height", 3, "0", False),
            ("o", "int32", "width", 4, "0", False),
        ],
        "NetStateRule": [
            ("o", "enum:.caffe.Phase", "phase", 1, None, False),
            ("o", "int32", "min_level", 2, None, False),
            ("o", "int32", "max_level", 3, None, False),
            ("r", "string", "stage", 4, None, False),
            ("r", "string", "not_stage", 5, None, False),
        ],
        "ParamSpec": [
            ("o", "string", "name", 1, None, False),
            ("o", "float", "lr_mult", 3, "1", False),
            ("o", "float", "decay_mult", 4, "1", False),
        ],
        "ConvolutionParameter": [
            ("o", "uint32", "num_output", 1, None, False),
            ("o", "bool", "bias_term", 2, "true", False),
            ("r", "uint32", "pad", 3, None, False),
            ("r", "uint32", "kernel_size", 4, None, False),
            ("r", "uint32", "stride", 6, None, False),
            ("r", "uint32", "dilation", 18, None, False),
            ("o", "uint32", "pad_h", 9, "0", False),
            ("o", "uint32", "pad_w", 10, "0", False),
            ("o", "uint32", "kernel_h", 11, None, False),
            ("o", "uint32", "kernel_w", 12, None, False),
            ("o", "uint32", "stride_h", 13, None, False),
            ("o", "uint32", "stride_w", 14, None, False),
            ("o", "uint32", "group", 5, "1", False),
            ("o", "int32", "axis", 16, "1", False),
        ],
        "InnerProductParameter": [
            ("o", "uint32", "num_output", 1, None, False),
            ("o", "bool", "bias_term", 2, "true", False),
            ("o", "int32", "axis", 5, "1", False),
            ("o", "bool", "transpose", 6, "false", False),
        ],
        "PoolingParameter": [
            ("o", "enum:.caffe.PoolMethod", "pool", 1, "MAX", False),
            ("o", "uint32", "pad", 4, "0", False),
            ("o", "uint32", "pad_h", 9, "0", False),
            ("o", "uint32", "pad_w", 10, "0", False),
            ("o", "uint32", "kernel_size", 2, None, False),
            ("o", "uint32", "kernel_h", 5, None, False),
            ("o", "uint32", "kernel_w", 6, None, False),
            ("o", "uint32", "stride", 3, "1", False),
            ("o", "uint32", "stride_h", 7, None, False),
            ("o", "uint32", "stride_w", 8, None, False),
            ("o", "bool", "global_pooling", 12, "false", False),
        ],
        "LRNParameter": [
            ("o", "uint32", "local_size", 1, "5", False),
            ("o", "float", "alpha", 2, "1", False),
            ("o", "float", "beta", 3, "0.75", False),
            ("o", "enum:.caffe.NormRegion", "norm_region", 4, "ACROSS_CHANNELS", False),
            ("o", "float", "k", 5, "1", False),
        ],
        "ReLUParameter": [("o", "float", "negative_slope", 1, "0", False)],
        "DropoutParameter": [("o", "float", "dropout_ratio", 1, "0.5", False)],
        "SoftmaxParameter": [("o", "int32", "axis", 2, "1", False)],
        "InputParameter": [("r", ".caffe.BlobShape", "shape", 1, None, False)],
        "LayerParameter": [
            ("o", "string", "name", 1, None, False),
            ("o", "string", "type", 2, None, False),
            ("r", "string", "bottom", 3, None, False),
            ("r", "string", "top", 4, None, False),
            ("o", "enum:.caffe.Phase", "phase", 10, None, False),
            ("r", ".caffe.ParamSpec", "param", 6, None, False),
            ("r", ".caffe.BlobProto", "blobs", 7, None, False),
            ("r", ".caffe.NetStateRule", "include", 8, None, False),
            ("r", ".caffe.NetStateRule", "exclude", 9, None, False),
            ("o", ".caffe.ConvolutionParameter", "convolution_param", 106, None, False),
            ("o", ".caffe.DropoutParameter", "dropout_param", 108, None, False),
            ("o", ".caffe.InnerProductParameter", "inner_product_param", 117, None, False),
            ("o", ".caffe.InputParameter", "input_param", 143, None, False),
            ("o", ".caffe.LRNParameter", "lrn_param", 118, None, False),
            ("o", ".caffe.PoolingParameter", "pooling_param", 121, None, False),
            ("o", ".caffe.ReLUParameter", "relu_param", 123, None, False),
            ("o", ".caffe.SoftmaxParameter", "softmax_param", 125, None, False),
        ],
        "V1LayerParameter": [
            ("r", "string", "bottom", 2, None, False),
            ("r", "string", "top", 3, None, False),
            ("o", "string", "name", 4, None, False),
            ("r", ".caffe.NetStateRule", "include", 32, None, False),
            ("r", ".caffe.NetStateRule", "exclude", 33, None, False),
            ("o", "enum:.caffe.V1LayerType", "type", 5, None, False),
            ("r", ".caffe.BlobProto", "blobs", 6, None, False),
            ("r", "float", "blobs_lr", 7, None, False),
            ("r", "float", "weight_decay", 8, None, False),
            ("o", ".caffe.ConvolutionParameter", "convolution_param", 10, None, False),
            ("o", ".caffe.DropoutParameter", "dropout_param", 12, None, False),
            ("o", ".caffe.InnerProductParameter", "inner_product_param", 17, None, False),
            ("o", ".caffe.LRNParameter", "lrn_param", 18, None, False),
            ("o", ".caffe.PoolingParameter", "pooling_param", 19, None, False),
            ("o", ".caffe.ReLUParameter", "relu_param", 30, None, False),
            ("o", ".caffe.SoftmaxParameter", "softmax_param", 39, None, False),
        ],
        "NetParameter": [
            ("o", "string", "name", 1, None, False),
            ("r", "string", "input", 3, None, False),
            ("r", ".caffe.BlobShape", "input_shape", 8, None, False),
            ("r", "int32", "input_dim", 4, None, False),
            ("o", "bool", "force_backward", 5, "false", False),
            ("r", ".caffe.LayerParameter", "layer", 100, None, False),
            ("r", ".caffe.V1LayerParameter", "layers", 2, None, False),
        ],
    }


def _field(spec: tuple) -> descriptor_pb2.FieldDescriptorProto:
    label, ftype, name, number, default, packed = spec
    field = _F(name=name, number=number, json_name=name)
    field.label = _F.LABEL_REPEATED if label == "r" else _F.LABEL_OPTIONAL
    if ftype.startswith("enum:"):
        field.type = _F.TYPE_ENUM
        field.type_name = ftype[5:]
    elif ftype.startswith("."):
        field.type = _F.TYPE_MESSAGE
        field.type_name = ftype
    else:
        field.type = _TYPES[ftype]
    if default is not None:
        field.default_value = default
    if label == "r" and field.type not in (_F.TYPE_STRING, _F.TYPE_MESSAGE):
        field.options.packed = packed
    return field


def _file(packed: bool) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto(
        name=f"sentiment_caffe_{'packed' if packed else 'unpacked'}.proto",
        package="caffe", syntax="proto2")
    for name, values in _ENUMS.items():
        enum = proto.enum_type.add(name=name)
        for value_name, number in values:
            enum.value.add(name=value_name, number=number)
    for name, fields in _messages(packed).items():
        message = proto.message_type.add(name=name)
        message.field.extend(_field(spec) for spec in fields)
    return proto


@functools.lru_cache(maxsize=2)
def schema(packed: bool = True) -> SimpleNamespace:
    """Message classes (``NetParameter``, ``LayerParameter``, ...) for one encoding."""
    pool = descriptor_pool.DescriptorPool()
    proto = _file(packed)
    pool.AddSerializedFile(proto.SerializeToString())
    file_descriptor = pool.FindFileByName(proto.name)
    classes = {
        name: message_factory.GetMessageClass(file_descriptor.message_types_by_name[name])
        for name in _messages(packed)
    }
    enums = {name: pool.FindEnumTypeByName(f"caffe.{name}") for name in _ENUMS}
    return SimpleNamespace(**classes, enums=enums)


def v1_type_name(number: int) -> str:
    """The V1 enum name for a legacy layer type number (``'CONVOLUTION'``)."""
    return schema().enums["V1LayerType"].values_by_number[number].name


V1_TO_TYPE = {
    "CONVOLUTION": "Convolution", "INNER_PRODUCT": "InnerProduct", "RELU": "ReLU",
    "POOLING": "Pooling", "LRN": "LRN", "DROPOUT": "Dropout", "SOFTMAX": "Softmax",
    "DATA": "Data", "IMAGE_DATA": "ImageData", "ACCURACY": "Accuracy",
    "SOFTMAX_LOSS": "SoftmaxWithLoss", "SPLIT": "Split", "CONCAT": "Concat",
    "SIGMOID": "Sigmoid", "TANH": "TanH", "FLATTEN": "Flatten", "ELTWISE": "Eltwise",
    "MEMORY_DATA": "MemoryData", "HDF5_DATA": "HDF5Data", "WINDOW_DATA": "WindowData",
    "DUMMY_DATA": "DummyData", "SILENCE": "Silence", "ARGMAX": "ArgMax",
}
