"""``bgtask.Queue``: a queue shared by the main program and any number of tasks.

For local tasks, the items travel through the kernel, never through a third process (for tasks
on Ray, a Ray actor holds them: ``on_ray``)::

    producers --send--> [ datagram socket (SOCK_SEQPACKET on Linux) ] --recv--> consumers
                 |                                                        |
                 +-- what the socket has no room for: in the main program, a backlog that a
                     feeder thread sends on (one per process, only while a backlog exists);
                     in a task, a message to its main program, which sends it on

    shared page (a memory file every process maps): the state, and each process's counts

One module per job, imports running down the list::

    api        Queue and ShutDown, iteration; how a queue travels in a call (_rebuild)
    on_ray     a queue for tasks on Ray: a Ray actor holds its items (RayEndpoint, Holder)
    endpoint   a process's side of a queue: put, get, shutdown, join; places; adopt()
    feeder     what the socket has no room for: the backlog, the feeder thread, forwarding
    transport  items as datagrams: pickling, memory files for large ones, send and receive
    places     a bounded queue's free places: a pipe of one byte each
    ledger     sums over every process; what a process that is gone left (and its places)
    page       the shared page: the state, a slot of counts per process, the page lock

Items a task hands to its main program are safe from the task's crash; the main program's own
backlog lives as long as it does.
"""

from .api import Queue, ShutDown, _rebuild, _rebuild_on_ray
from .endpoint import adopt

__all__ = ["Queue", "ShutDown", "_rebuild", "_rebuild_on_ray", "adopt"]
