"""A TCP proxy on 127.0.0.1 that adds latency: every chunk it reads is forwarded ``delay_s`` later, in each
direction, in order (a delay line, not a bandwidth cap: chunks in flight overlap). This kernel has no netem, so
this stands in for ``tc qdisc ... netem delay``; a device config points at the proxy instead of the device."""
from __future__ import annotations

import queue
import socket
import threading
import time
from typing import List, Optional, Tuple


class DelayProxy:
    def __init__(self, target: Tuple[str, int], delay_s: float) -> None:
        self.target, self.delay_s = target, delay_s
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port: int = self._listener.getsockname()[1]
        self.connections = 0
        self._lock = threading.Lock()
        self._socks: List[socket.socket] = []
        self._threads: List[threading.Thread] = []
        self._closed = False
        self._spawn(self._accept, "proxy-accept")

    def _spawn(self, fn, name: str, *args) -> None:
        t = threading.Thread(target=fn, args=args, name=name, daemon=True)
        with self._lock:
            self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return                                   # closed
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self._socks += [client, upstream]
                self.connections += 1
            left = [2]

            def finished(pair=(client, upstream), left=left) -> None:
                with self._lock:
                    left[0] -= 1
                    last = left[0] == 0
                if last:                                 # both directions are done: close the pair
                    for sock in pair:
                        try:
                            sock.shutdown(socket.SHUT_RDWR)  # wakes a reader still blocked in recv (close does not)
                        except OSError:
                            pass
                        sock.close()

            for src, dst in ((client, upstream), (upstream, client)):
                q: "queue.Queue[Optional[Tuple[float, bytes]]]" = queue.Queue()
                self._spawn(self._read, "proxy-read", src, q)
                self._spawn(self._write, "proxy-write", dst, q, finished)

    def _read(self, src: socket.socket, q: "queue.Queue") -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                q.put(None)
                return
            q.put((time.monotonic() + self.delay_s, data))

    def _write(self, dst: socket.socket, q: "queue.Queue", finished) -> None:
        try:
            while True:
                item = q.get()
                if item is None:
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                due, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                try:
                    dst.sendall(data)
                except OSError:
                    return
        finally:
            finished()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            socks, threads = list(self._socks), list(self._threads)
        try:
            self._listener.shutdown(socket.SHUT_RDWR)   # wakes accept(), which close() alone does not
        except OSError:
            pass
        self._listener.close()
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for t in threads:
            t.join(timeout=5)

    def alive_threads(self) -> int:
        with self._lock:
            return sum(t.is_alive() for t in self._threads)
