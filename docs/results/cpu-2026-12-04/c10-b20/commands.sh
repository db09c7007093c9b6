set -x
export PYTHONPATH=/tmp/r20 PATH=/work/main/.venv/bin:$PATH
cd /tmp/r20
COMMON="-S grid.datasets=[cifar10] -S datasets.cifar10.source=imagefolder -S datasets.cifar10.root=/tmp/c10 -S datasets.cifar10.download=false -S grid.budgets=[20] -S grid.mtt_noe=[] -S evaluate.nets=[convnet3] -S evaluate.seeds=[0,1,2] -S evaluate.epochs=300 -S experts.dm.iterations=400 -S experts.dm.batch_real=128 -S distill.log_every=20"
date
dvc exp run -n c10-b20-random $COMMON -S 'grid.experts=[]' -S 'grid.baselines=[random]' -S 'grid.noe=[2,1]'
echo "EXIT $?"; date
dvc exp run -n c10-b20-dm-noe1 $COMMON -S 'grid.experts=[dm]' -S 'grid.baselines=[random]' -S 'grid.noe=[1]'
echo "EXIT $?"; date
