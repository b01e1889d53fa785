"""Zero the payload of every fatbin ELF/PTX entry whose SM arch is not in KEEP, in place.
Headers and sizes stay untouched, so the driver walks the fatbin as before and picks the
sm_90 image on an H100/H200; the zeroed images compress to almost nothing."""
import struct, sys
path = sys.argv[1]; KEEP = {int(a) for a in sys.argv[2].split(",")} if len(sys.argv) > 2 else {90}
data = bytearray(open(path, "rb").read())
# find .nv_fatbin via section headers
e_shoff, = struct.unpack_from("<Q", data, 0x28)
e_shentsize, e_shnum, e_shstrndx = struct.unpack_from("<HHH", data, 0x3A)
def sh(i):
    return struct.unpack_from("<IIQQQQIIQQ", data, e_shoff + i * e_shentsize)
stroff = sh(e_shstrndx)[4]
sec = None
for i in range(e_shnum):
    h = sh(i)
    name = data[stroff + h[0]: data.index(b"\0", stroff + h[0])].decode()
    if name == ".nv_fatbin":
        sec = (h[4], h[5])
assert sec, "no .nv_fatbin"
off, size = sec
p, end_sec = off, off + size
kept = zeroed = nfat = 0
while p + 16 <= end_sec:
    magic, ver, hsz, fsz = struct.unpack_from("<IHHQ", data, p)
    if magic != 0xBA55ED50:
        p += 8; continue
    nfat += 1
    q, end = p + hsz, p + hsz + fsz
    while q < end:
        kind, ever, ehsz, psz = struct.unpack_from("<HHIQ", data, q)
        arch, = struct.unpack_from("<I", data, q + 28)
        assert kind in (1, 2) and ehsz >= 64, (hex(q), kind, ehsz)
        if arch in KEEP:
            kept += psz
        else:
            data[q + ehsz: q + ehsz + psz] = bytes(psz); zeroed += psz
        q += ehsz + psz
    assert q == end, (q, end)
    p = end
open(path, "wb").write(data)
print(f"{path}: {nfat} fatbins, kept {kept} bytes (arch {sorted(KEEP)}), zeroed {zeroed} bytes")
