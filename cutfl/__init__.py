"""`cutfl`: the command line, and the composition root of cut-fl.

One module per command group; each registers its sub-commands with `add_commands(sub, parser_class)` and
imports what it needs only when a command runs, so `cutfl --help` stays fast and Flower-free.

    cli.py               main(): the parser and the one-line error handling every command shares
    args.py              argument types (budgets, bounded numbers) that reject bad input in one line
    model_commands.py    pretrain, evaluate, trivial
    prune_commands.py    prune, bench (the CUT engine on one machine)
    export_commands.py   export (ONNX + parity + latency), infer (onnxruntime only)
    simulate_command.py  simulate (a fleet on Flower's simulation engine)
    deploy_commands.py   certs, connect, run (a real SuperLink)
"""

import os

# OpenMP threads that spin while they wait stall when another process shares the cores: on this 2-core
# machine with other jobs running, a 2-thread training step took 4-8x as long as a 1-thread one with the
# default policy and about 1.2x with passive waiting (BENCHMARKS.md, "Threads"). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
