/usr/bin/fio --name=prepare --filename=/dev/shm/gpuio-cache.Vm2b7f/table.bin --rw=write --bs=1M --size=1G --direct=1 --ioengine=io_uring --iodepth=16
