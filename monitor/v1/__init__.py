"""Generated wire protocol (monitor.v1). Regenerate with scripts/gen_proto.sh; never edit."""
