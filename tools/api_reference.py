"""docs/api/reference.md from protos/: every service, RPC, message, field and enum value with
its comment, in the order the .proto files declare them. The comments in protos/ are the one
home of what the wire contract means; this renders them (`make docs`), and
tests/test_docs.py fails when the file and protos/ disagree."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc  # type: ignore[import-untyped]

from tools import ROOT, write

PROTOS = ROOT / "protos"
TARGET = ROOT / "docs" / "api" / "reference.md"

# Field numbers of descriptor.proto, as SourceCodeInfo paths use them.
_MESSAGE, _ENUM, _SERVICE = 4, 5, 6
_FIELD, _NESTED_ENUM = 2, 4
_VALUE, _METHOD = 2, 2

_TYPES = {
    descriptor_pb2.FieldDescriptorProto.TYPE_STRING: "string",
    descriptor_pb2.FieldDescriptorProto.TYPE_BOOL: "bool",
    descriptor_pb2.FieldDescriptorProto.TYPE_INT32: "int32",
    descriptor_pb2.FieldDescriptorProto.TYPE_INT64: "int64",
    descriptor_pb2.FieldDescriptorProto.TYPE_UINT32: "uint32",
    descriptor_pb2.FieldDescriptorProto.TYPE_UINT64: "uint64",
    descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE: "double",
    descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT: "float",
    descriptor_pb2.FieldDescriptorProto.TYPE_BYTES: "bytes",
}


def _files() -> list[descriptor_pb2.FileDescriptorProto]:
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "set.pb"
        include = str(Path(protoc.__file__).parent / "_proto")
        code = protoc.main(
            [
                "protoc",
                f"-I{PROTOS}",
                f"-I{include}",
                "--include_source_info",
                f"--descriptor_set_out={out}",
                *sources,
            ]
        )
        if code != 0:
            raise SystemExit(f"protoc failed ({code})")
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return [f for f in files if f.name in sources]


def _comment(comments: dict[tuple[int, ...], str], *path: int) -> str:
    return " ".join(line.strip() for line in comments.get(path, "").strip().splitlines())


def _type(field: descriptor_pb2.FieldDescriptorProto, package: str) -> str:
    if not field.type_name:
        name = _TYPES[field.type]
    elif field.type_name.startswith(".google."):
        name = field.type_name.rsplit(".", 1)[-1]
    else:  # Outer.Inner for a nested type, as its heading says
        name = field.type_name.removeprefix(f".{package}.")
        name = f"[{name}](#{name.replace('.', '').lower()})"
    if field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED:
        return f"repeated {name}"
    if field.proto3_optional:
        return f"optional {name}"
    return name


def _render(file: descriptor_pb2.FileDescriptorProto) -> Iterator[str]:
    comments = {
        tuple(loc.path): loc.leading_comments or loc.trailing_comments
        for loc in file.source_code_info.location
        if loc.leading_comments or loc.trailing_comments
    }
    yield f"## `{file.name}` (package `{file.package}`)"
    yield ""
    for s, service in enumerate(file.service):
        yield f"### service {service.name}"
        yield ""
        if text := _comment(comments, _SERVICE, s):
            yield text
            yield ""
        yield "| RPC | request | response | what it does |"
        yield "| --- | --- | --- | --- |"
        for m, method in enumerate(service.method):
            request = method.input_type.rsplit(".", 1)[-1]
            response = method.output_type.rsplit(".", 1)[-1]
            stream = "stream " if method.server_streaming else ""
            what = _comment(comments, _SERVICE, s, _METHOD, m)
            yield (
                f"| `{method.name}` | [{request}](#{request.lower()}) "
                f"| {stream}[{response}](#{response.lower()}) | {what} |"
            )
        yield ""
    for i, message in enumerate(file.message_type):
        yield f"### {message.name}"
        yield ""
        if text := _comment(comments, _MESSAGE, i):
            yield text
            yield ""
        if message.field:
            yield "| field | number | type | meaning |"
            yield "| --- | --- | --- | --- |"
            for f, field in enumerate(message.field):
                oneof = ""
                if field.HasField("oneof_index") and not field.proto3_optional:
                    oneof = f" (one of `{message.oneof_decl[field.oneof_index].name}`)"
                meaning = _comment(comments, _MESSAGE, i, _FIELD, f)
                kind = _type(field, file.package)
                yield f"| `{field.name}` | {field.number} | {kind}{oneof} | {meaning} |"
            yield ""
        else:
            yield "No fields."
            yield ""
        for e, enum in enumerate(message.enum_type):
            yield from _enum(enum, comments, (_MESSAGE, i, _NESTED_ENUM, e), f"{message.name}.")
    for e, enum in enumerate(file.enum_type):
        yield from _enum(enum, comments, (_ENUM, e), "")


def _enum(
    enum: descriptor_pb2.EnumDescriptorProto,
    comments: dict[tuple[int, ...], str],
    path: tuple[int, ...],
    outer: str,
) -> Iterator[str]:
    yield f"### {outer}{enum.name}"
    yield ""
    if text := _comment(comments, *path):
        yield text
        yield ""
    yield "| value | number | meaning |"
    yield "| --- | --- | --- |"
    for v, value in enumerate(enum.value):
        yield f"| `{value.name}` | {value.number} | {_comment(comments, *path, _VALUE, v)} |"
    yield ""


def render() -> str:
    lines = [
        "# API reference",
        "",
        "Generated from `protos/` by `make docs`: edit the comments there, not this file",
        "(`tests/test_docs.py` fails when the two disagree). Errors, metadata and the watch",
        "protocol: [the API guide](../api.md).",
        "",
    ]
    for file in _files():
        lines += _render(file)
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    write(TARGET, render())


if __name__ == "__main__":
    main()
