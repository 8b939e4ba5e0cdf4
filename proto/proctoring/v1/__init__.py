"""proctoring.v1: alerts_pb2, delivery_pb2, delivery_pb2_grpc (generated at build time)."""
