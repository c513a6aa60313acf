"""cut-fl's Flower ClientApp: a device that scores channel importance on its private data and receives a
compact model for its own tasks and budget. `client.app:app` is the component; `protocol.records` is the
Flower record codec shared with the server."""
