"""Pure logic of the store: validation, the event writer, watch fan-out, task policy."""
