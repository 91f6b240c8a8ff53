"""A target process for the tests: a Mooncake-compatible engine serving one managed buffer.

    python peer.py METADATA NAME LENGTH SEED

Prints one JSON line {"name", "addr", "len"} when ready, then answers commands on stdin:
`notifies` (prints the notifications received as JSON), `quit`.
"""

import json
import sys

import numpy as np

from tidewire.mooncake import TransferEngine


def main() -> None:
    metadata, name, length, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    engine = TransferEngine()
    host = name if metadata != "P2PHANDSHAKE" else "127.0.0.1"
    if engine.initialize(host, metadata, "tcp", "") != 0:
        print(json.dumps({"error": "initialize failed"}), flush=True)
        sys.exit(1)
    addr = engine.allocate_managed_buffer(length)
    engine.write_bytes_to_buffer(addr, np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8).tobytes(), length)
    segment = f"127.0.0.1:{engine.get_rpc_port()}" if metadata == "P2PHANDSHAKE" else name
    print(json.dumps({"name": segment, "addr": addr, "len": length}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "notifies":
            print(json.dumps([[n.name, n.msg] for n in engine.get_notifies()]), flush=True)
        elif cmd == "quit":
            break


if __name__ == "__main__":
    main()
