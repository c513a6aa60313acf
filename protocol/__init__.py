"""The Flower contract the ServerApp and the ClientApp share; neither app imports the other.

    records.py   message types, record names, and the records codec (ConfigRecord / ArrayRecord /
                 MetricRecord <-> protobuf bytes and numpy arrays), every malformed record a ValidationError
    phases.py    typed configs of each phase (what travels beside the protobuf messages), each default once
    layout.py    the secure-aggregation vector layout both sides flatten and unflatten

It may import flwr and `cut` (the protobuf messages live in cut.messages / cut.wire), nothing else of ours.
"""
