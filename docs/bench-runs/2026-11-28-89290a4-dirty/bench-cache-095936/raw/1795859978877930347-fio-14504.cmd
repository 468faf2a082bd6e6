/usr/bin/fio --name=ref --filename=/dev/shm/gpuio-cache.Vm2b7f/table.bin --rw=randread --bs=4k --iodepth=64 --ioengine=io_uring --direct=1 --runtime=3s --time_based --size=1G --output-format=terse
