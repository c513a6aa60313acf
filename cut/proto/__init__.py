"""Generated protobuf code for protos/cutfl.proto (committed; .ci/check_proto.sh checks it is current).

Do not edit cutfl_pb2.py(i) by hand: change protos/cutfl.proto and regenerate with
`python -m grpc_tools.protoc -Iprotos --python_out=cut/proto --pyi_out=cut/proto protos/cutfl.proto`.
Only cut/wire.py should import this package.
"""
