"""This node's address and the sockets rlft listens on: each binds the node's address, never all interfaces.

Imports the standard library and Ray's address helper (torch's ``TCPStore`` and psutil only inside the functions
that use them), so every floor of rlft can use it: the actor helpers, the stack dumps, the learners' and the weight
groups' rendezvous.
"""

from __future__ import annotations

import contextlib
import os
import socket

import ray


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def node_ip() -> str:
    """This process's node address, as other nodes reach it: 127.0.0.1 on a local cluster (rlft starts it on
    loopback, ``rlft.distributed.cluster``), the node's IP on a multi-node one."""
    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


# ------------------------------------------------------------------------------------------------ listeners
# Every socket rlft listens on binds one address, the node's (``node_ip``), never all interfaces: on a local cluster
# nothing is reachable from outside the machine. A torch.distributed ``TCPStore`` server binds all interfaces unless
# it is handed a socket already listening (``master_listen_fd``), and gloo's connections listen on the address its
# device is made for (``GLOO_SOCKET_IFNAME`` for groups made by ``init_process_group``).


def listen_socket(host: str | None = None, port: int = 0) -> socket.socket:
    """A TCP socket listening on ``host`` (default: this node's address) and ``port`` (0: one the OS picks)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host or node_ip(), port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def tcp_store(host: str, port: int, world_size: int | None, timeout, listener: socket.socket | None = None):
    """A torch.distributed ``TCPStore`` at ``host:port``: its server (``listener`` given, or ``port`` free here)
    listens on ``listener`` (``listen_socket``), a client otherwise. The store takes the socket over."""
    from torch.distributed import TCPStore

    if listener is None:
        return TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    fd = listener.detach()
    try:
        return TCPStore(host, port, world_size, is_master=True, timeout=timeout, master_listen_fd=fd)
    except BaseException:
        with contextlib.suppress(OSError):  # the store may have closed it already
            os.close(fd)
        raise


def local_address_toward(host: str) -> str:
    """The address of this machine that reaches ``host`` (127.0.0.1 for a loopback ``host``); no packet is sent."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((host, 9))
        return sock.getsockname()[0]


def bind_collectives_to(address: str) -> None:
    """Have gloo (and NCCL's bootstrap) groups made from now on in this process listen on the interface holding
    ``address`` only, unless GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME already say where."""
    import psutil

    for interface, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == address for a in addresses):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
            return
