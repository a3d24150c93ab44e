"""The monitor: the main program's thread that owns every task's end, the record of each task
process it follows, and the offload threads for what must not run in it."""
