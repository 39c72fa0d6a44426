"""A teacher behind an HTTP server (`distill serve`) and the client a student job runs (`teacher.engine: remote`).

protocol.py  the wire format: requests and `TeacherTargets` as safetensors bodies, validated on arrival
server.py    `distill serve`: aiohttp, dynamic batching, a bounded queue, the existing engines behind it
client.py    `RemoteTeacher`: the teacher source a student job uses, prefetching, retrying, checking identity
"""
