"""Socket ping-pong floor: round trip between two processes over a Unix
socket pair, the server busy-working WORK_MS before answering; prints the
round trip minus the work. Usage: python3 bench/pingpong.py WORK_MS"""
import socket, os, time, sys
busy=float(sys.argv[1])/1e3
a,b=socket.socketpair()
if os.fork()==0:
    while True:
        d=b.recv(64)
        if not d: os._exit(0)
        t=time.perf_counter()
        while time.perf_counter()-t<busy: pass
        b.send(d)
ts=[]
for i in range(2000):
    t=time.perf_counter(); a.send(b'x'); a.recv(64); ts.append((time.perf_counter()-t)*1e3-busy*1e3)
a.close(); ts.sort(); print("busy %.1f ms: round trip minus work p50 %.3f ms p90 %.3f"%(busy*1e3, ts[len(ts)//2], ts[int(len(ts)*.9)]))
