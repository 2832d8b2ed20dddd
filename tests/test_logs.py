"""proxy.logs: every record is one whole JSON line on stdout, however many threads log at once
(lines longer than a pipe's atomic write included)."""

import json
import logging
import os
import threading

from proxy import logs


def test_lines_from_many_threads_arrive_whole():
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    handler = logs._Lines(stream)
    handler.setFormatter(logs.make_formatter())
    logger = logging.Logger("lines-test")
    logger.addHandler(handler)
    chunks = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(read_end, 65536), b"")))
    reader.start()

    def emit(n):
        for i in range(50):  # short lines and lines far longer than PIPE_BUF (tracebacks, say)
            logger.info("event", extra={"writer": n, "i": i, "detail": str(n) * (20 if i % 2 else 9000)})

    writers = [threading.Thread(target=emit, args=(n,)) for n in range(8)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    stream.close()
    reader.join()
    lines = b"".join(chunks).decode().splitlines()
    records = [json.loads(line) for line in lines]  # a torn or interleaved line would not parse
    assert len(records) == 8 * 50
    assert all(r["detail"] == str(r["writer"]) * (20 if r["i"] % 2 else 9000) for r in records)


def test_numbers_in_free_text_are_masked_like_address_fields():
    text = "21211 The 'To' number whatsapp:+14155550111 is not a valid phone number (nor +1 (415) 555-0122)."
    masked = logs.mask_numbers(text)
    assert "whatsapp:+1415*****11" in masked and masked.startswith("21211 The 'To' number")
    assert "4155550111" not in masked and "555-0122" not in masked
