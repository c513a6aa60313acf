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
