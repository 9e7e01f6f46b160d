"""Ray orchestration and I/O for pretokenization."""
