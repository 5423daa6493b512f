"""A small client of Tandem's public API (``tandem.v1.Generation``).

Start a stack first (``make serve``), then::

    .venv/bin/python examples/python_client.py "Once upon a time"
    .venv/bin/python examples/python_client.py --target 127.0.0.1:50051 --max-tokens 32 "Love is"

It calls ``GetModelInfo``, then ``Generate`` (one response), then ``GenerateStream``
(text printed as it arrives). A gRPC error prints ``error: <CODE>: <details>`` and
exits 1. The stubs come from the installed package: ``from tandem.v1 import ...``.
"""

from __future__ import annotations

import argparse
import sys

import grpc

from tandem.v1 import generation_pb2, generation_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Call GetModelInfo, Generate and GenerateStream.")
    parser.add_argument("prompt", help="prompt text (tokenized by the router)")
    parser.add_argument("--target", default="127.0.0.1:50051", help="router address (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=32, help="most tokens to generate (default: 32)")
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline of each call in seconds")
    args = parser.parse_args(argv)

    with grpc.insecure_channel(args.target) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        try:
            info = stub.GetModelInfo(generation_pb2.GetModelInfoRequest(), timeout=args.timeout)
            print(f"model {info.model_name} ({info.architecture}), max_model_len {info.max_model_len}")

            request = generation_pb2.GenerateRequest(
                prompt=args.prompt,
                sampling=generation_pb2.SamplingParams(max_tokens=args.max_tokens, temperature=0.0),
            )
            response = stub.Generate(request, timeout=args.timeout)
            print(f"[{response.request_id}] {args.prompt}{response.text}")
            print(
                f"finish_reason={generation_pb2.FinishReason.Name(response.finish_reason)} "
                f"prompt_tokens={response.usage.prompt_tokens} "
                f"completion_tokens={response.usage.completion_tokens}"
            )

            # Same request, streamed; sampled with a fixed seed so reruns print the same text.
            request.sampling.temperature = 0.8
            request.sampling.top_p = 0.95
            request.sampling.seed = 7
            sys.stdout.write(args.prompt)
            for message in stub.GenerateStream(request, timeout=args.timeout):
                sys.stdout.write(message.text)
                sys.stdout.flush()
                if message.finish_reason:
                    print(f"\nfinish_reason={generation_pb2.FinishReason.Name(message.finish_reason)}")
        except grpc.RpcError as error:
            print(f"\nerror: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
