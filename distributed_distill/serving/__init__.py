"""The wire between a student job and a served teacher; the server itself is `distill serve` (serve.py), a command
above the teacher engines it runs.

    protocol.py  the wire format: requests and `TeacherTargets` as safetensors bodies, validated on arrival; the
                 shared-secret token both sides read, and which hosts are loopback
    client.py    `RemoteTeacher`: the `teacher.engine: remote` source (teacher.ENGINES), prefetching, retrying,
                 checking the server's identity
"""
