"""``tandem generate``: one request to a running router, from the command line.

Calls ``tandem.v1.Generation/Generate`` (or ``GenerateStream`` with ``--stream``, printing
the text pieces as they arrive) and prints the completion, or with ``--json`` one JSON
object: request_id, text, token_ids, finish_reason (the enum name) and usage. A gRPC
error prints ``error: <CODE>: <details>`` to stderr and exits 1. Torch-free; gRPC is
imported when the command runs, so that building the ``tandem`` parser stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from cli.security_options import add_client_options, client_security_from_args
from cli.validators import non_negative_float, non_negative_int, positive_float, positive_int, probability

if TYPE_CHECKING:
    from tandem.v1 import generation_pb2, generation_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the options of ``tandem generate``."""
    parser.add_argument("prompt", help="prompt text (tokenized by the router)")
    parser.add_argument(
        "--target", default=DEFAULT_TARGET, metavar="HOST:PORT", help="router address (default: %(default)s)"
    )
    parser.add_argument("--request-id", default="", metavar="ID", help="request id (default: router assigns)")
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument(
        "--max-tokens",
        type=positive_int,
        default=64,
        metavar="N",
        help="most tokens to generate (default: 64)",
    )
    sampling.add_argument(
        "--temperature",
        type=non_negative_float,
        default=0.0,
        metavar="T",
        help="softmax temperature; 0 is greedy (default: 0.0)",
    )
    sampling.add_argument(
        "--top-p", type=probability, metavar="P", help="nucleus sampling in (0, 1] (default: off)"
    )
    sampling.add_argument(
        "--top-k", type=non_negative_int, default=0, metavar="K", help="keep the K likeliest tokens; 0 is off"
    )
    sampling.add_argument(
        "--seed", type=non_negative_int, metavar="S", help="seed of this request's random stream"
    )
    sampling.add_argument(
        "--ignore-eos", action="store_true", help="keep generating after end-of-sequence, up to --max-tokens"
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--stream", action="store_true", help="use GenerateStream and print text as it arrives"
    )
    output.add_argument(
        "--timeout", type=positive_float, metavar="S", help="deadline in seconds (default: none)"
    )
    output.add_argument(
        "--json",
        action="store_true",
        help="print request_id, text, token_ids, finish_reason and usage as JSON",
    )
    add_client_options(parser)


def build_request(args: argparse.Namespace) -> generation_pb2.GenerateRequest:
    """The ``GenerateRequest`` of the parsed options (``top_p`` and ``seed`` only when given)."""
    from tandem.v1 import generation_pb2

    sampling = generation_pb2.SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        ignore_eos=args.ignore_eos,
    )
    if args.top_p is not None:
        sampling.top_p = args.top_p
    if args.seed is not None:
        sampling.seed = args.seed
    return generation_pb2.GenerateRequest(request_id=args.request_id, prompt=args.prompt, sampling=sampling)


def run(args: argparse.Namespace) -> int:
    """Sends one request; returns 0, or 1 on a gRPC error."""
    import grpc

    from engine.security import bearer_metadata, open_channel
    from tandem.v1 import generation_pb2_grpc

    request = build_request(args)
    pieces: list[str] = []  # streamed text, filled as it arrives
    metadata = bearer_metadata(args.auth_token)
    with open_channel(args.target, client_security_from_args(args)) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        try:
            if args.stream:
                result = _stream(stub, request, args.timeout, pieces, metadata, echo=not args.json)
            else:
                response = stub.Generate(request, timeout=args.timeout, metadata=metadata)
                result = _result(response.request_id, response.text, response.token_ids, response)
        except grpc.RpcError as error:
            if pieces and not args.json:
                print()  # end the partly streamed line
            code = error.code()
            name = code.name if code is not None else "UNKNOWN"
            print(f"error: {name}: {error.details()}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.stream:
        print(flush=True)
    else:
        print(result["text"])
    return 0


def _stream(
    stub: generation_pb2_grpc.GenerationStub,
    request: generation_pb2.GenerateRequest,
    timeout: float | None,
    pieces: list[str],
    metadata: tuple[tuple[str, str], ...],
    *,
    echo: bool,
) -> dict[str, Any]:
    from tandem.v1 import generation_pb2

    token_ids: list[int] = []
    last = generation_pb2.GenerateStreamResponse()
    for message in stub.GenerateStream(request, timeout=timeout, metadata=metadata):
        pieces.append(message.text)
        token_ids.extend(message.token_ids)
        last = message
        if echo:
            sys.stdout.write(message.text)
            sys.stdout.flush()
    return _result(last.request_id, "".join(pieces), token_ids, last)


def _result(request_id: str, text: str, token_ids: Any, final: Any) -> dict[str, Any]:
    """The ``--json`` object; ``final`` is the response carrying finish_reason and usage."""
    from tandem.v1 import generation_pb2

    return {
        "request_id": request_id,
        "text": text,
        "token_ids": list(token_ids),
        "finish_reason": generation_pb2.FinishReason.Name(final.finish_reason),
        "usage": {
            "prompt_tokens": final.usage.prompt_tokens,
            "completion_tokens": final.usage.completion_tokens,
            "cached_prompt_tokens": final.usage.cached_prompt_tokens,
        },
    }
