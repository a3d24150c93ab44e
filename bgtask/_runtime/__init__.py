"""The task runtime: what runs inside a task process (or a Ray worker) around the user's
function. Imports only what is shared, never the main program's side."""
