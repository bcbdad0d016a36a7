"""Reads a control-vector GGUF with the `gguf` Python package (llama.cpp's own reader) and prints
its header and tensors as JSON: the independent check that persona-lens writes what llama.cpp
and repeng read. Usage: read_control_vector.py FILE.gguf"""
import json, sys

import gguf

r = gguf.GGUFReader(sys.argv[1])


def field(name):
    f = r.fields.get(name)
    if f is None:
        return None
    v = f.parts[f.data[0]]
    if f.types and f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(v).decode("utf-8")
    return v.tolist()[0]


print(json.dumps({
    "architecture": field("general.architecture"),
    "model_hint": field("controlvector.model_hint"),
    "layer_count": field("controlvector.layer_count"),
    "tensors": {t.name: {"shape": [int(x) for x in t.shape], "type": t.tensor_type.name,
                         "values": [float(x) for x in t.data.reshape(-1)]} for t in r.tensors},
}))
