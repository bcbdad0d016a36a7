// MKL's packed-weight API against plain sgemm on the engine's product shapes (issue 20 lever):
// y[M,N] = x[M,K] W^T with W [N,K] row-major, as candle calls it. SmolLM2 (d 576, kv 192,
// ff 1536) and gemma-3-270m (d 640, ff 2048) shapes at M = 45 (one chat prompt) and 720 (16).
// Each shape alternates the two calls over 5 rounds and keeps each one's best time.
//   gcc -O2 bench/mkl_packed.c -o /tmp/mkl_packed -ldl -lm
//   MKL_THREADING_LAYER=GNU /tmp/mkl_packed mkl/lib/libmkl_rt.so.3 2
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <math.h>
typedef void (*sgemm_t)(int,int,int,int,int,int,float,const float*,int,const float*,int,float,float*,int);
typedef size_t (*getsize_t)(int,int,int,int);
typedef void (*pack_t)(int,int,int,int,int,int,float,const float*,int,float*);
typedef void (*compute_t)(int,int,int,int,int,int,const float*,int,const float*,int,float,float*,int);
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int argc,char**argv){
  if(argc<3){fprintf(stderr,"usage: %s mkl/lib/libmkl_rt.so.3 THREADS\n",argv[0]);return 2;}
  void*h=dlopen(argv[1],RTLD_NOW); if(!h){fprintf(stderr,"%s\n",dlerror());return 1;}
  sgemm_t sg=dlsym(h,"cblas_sgemm"); getsize_t gs=dlsym(h,"cblas_sgemm_pack_get_size"); pack_t pk=dlsym(h,"cblas_sgemm_pack"); compute_t cp=dlsym(h,"cblas_sgemm_compute");
  int (*setl)(int)=dlsym(h,"MKL_Set_Threading_Layer"); setl(3);
  int (*nt)(int)=dlsym(h,"MKL_Set_Num_Threads_Local"); nt(atoi(argv[2]));
  int Ms[]={45,720}; int shapes[][2]={{576,576},{192,576},{1536,576},{576,1536},{640,640},{2048,640},{640,2048}};
  for(int mi=0;mi<2;mi++) for(int si=0;si<7;si++){
    int M=Ms[mi],N=shapes[si][0],K=shapes[si][1];
    float*x=malloc(4L*M*K),*w=malloc(4L*N*K),*y=malloc(4L*M*N),*y2=malloc(4L*M*N);
    for(long i=0;i<(long)M*K;i++)x[i]=sinf(i*0.1f); for(long i=0;i<(long)N*K;i++)w[i]=cosf(i*0.37f);
    size_t sz=gs(162,720,N,K); float*buf=malloc(sz);
    pk(101,162,112,720,N,K,1.0f,w,K,buf);
    int reps= M<100? 400:40; double best1=1e9,best2=1e9;
    for(int r=0;r<5;r++){
      double t=now(); for(int i=0;i<reps;i++) sg(101,111,112,M,N,K,1.0f,x,K,w,K,0.0f,y,N); double a=(now()-t)/reps; if(a<best1)best1=a;
      t=now(); for(int i=0;i<reps;i++) cp(101,111,151,M,N,K,x,K,buf,K,0.0f,y2,N); double b=(now()-t)/reps; if(b<best2)best2=b;
    }
    double md=0; for(long i=0;i<(long)M*N;i++){double d=fabs(y[i]-y2[i]); if(d>md)md=d;}
    printf("M=%4d N=%4d K=%4d sgemm %.1f us  packed %.1f us  ratio %.2fx  maxdiff %.2g  packbytes %zu\n",M,N,K,best1*1e6,best2*1e6,best1/best2,md,sz);
    free(x);free(w);free(y);free(y2);free(buf);
  }
}
