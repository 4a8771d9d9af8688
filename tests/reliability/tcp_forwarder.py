"""A TCP forwarder: python tcp_forwarder.py LISTEN_PORT TARGET_PORT (both on 127.0.0.1).

Stands in front of moto_server as the object store's endpoint: SIGKILLing it
and starting it again on the same port is an object store that goes away
for a while and comes back with its data (moto keeps its objects in memory,
so a killed moto_server would come back empty)."""

import asyncio
import sys


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


async def main(listen: int, target: int) -> None:
    async def forward(client_reader, client_writer):
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))

    server = await asyncio.start_server(forward, "127.0.0.1", listen, reuse_address=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
