"""cut-fl's Flower ServerApp: profile devices, collect their importance scores, aggregate them per task,
fuse and prune per device, deliver compact models, evaluate and report. `server.app:app` is the component."""
