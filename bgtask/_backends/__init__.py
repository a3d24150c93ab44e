"""The backends: how a task process is had. ``launch`` is the seam; one module per backend
(the zygote's client and the zygote process, multiprocessing's methods, the Ray driver and the
Ray worker). The zygote process and the Ray worker are task-side code: they import only the
task runtime and what is shared."""
