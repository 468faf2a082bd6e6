/usr/bin/fio --name=prepare --filename=/tmp/gpuio-cache.sJHEeU/table.bin --rw=write --bs=1M --size=1G --direct=1 --ioengine=io_uring --iodepth=16
