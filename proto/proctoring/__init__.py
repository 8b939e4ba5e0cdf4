"""Generated from proto/proctoring (the protobuf package name); see livekit_proctor.protogen."""
