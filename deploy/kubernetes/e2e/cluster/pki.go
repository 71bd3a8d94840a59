//go:build linux

package cluster

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// Identities the control plane components authenticate as. The scheduler and
// controller manager names are the ones the bootstrap RBAC policy binds.
const (
	adminUser             = "kubernetes-admin"
	schedulerUser         = "system:kube-scheduler"
	controllerManagerUser = "system:kube-controller-manager"
	frontProxyClientUser  = "front-proxy-client"
	kubeletClientUser     = "kube-apiserver-kubelet-client"
	mastersGroup          = "system:masters"
)

// serviceIP is the first address of serviceCIDR, which the API server gives to
// the "kubernetes" Service. It is only ever a certificate SAN here.
const (
	serviceCIDR = "10.96.0.0/16"
	serviceIP   = "10.96.0.1"
)

// keyPair is a certificate and its key, both PEM-encoded and on disk.
type keyPair struct {
	CertPEM  []byte
	KeyPEM   []byte
	CertPath string
	KeyPath  string

	cert *x509.Certificate
	key  crypto.Signer
}

// pki is every credential the control plane needs, written under one directory.
type pki struct {
	CA           *keyPair
	Serving      *keyPair
	FrontProxyCA *keyPair
	FrontProxy   *keyPair
	Admin        *keyPair
	Scheduler    *keyPair
	Controller   *keyPair
	// KubeletClient is what the API server presents to nodes' kubelet
	// APIs (exec, logs, port-forward).
	KubeletClient *keyPair

	// ServiceAccountKey signs service account tokens (API server) and is
	// what the controller manager's token controller signs with too.
	ServiceAccountKeyPath string
	ServiceAccountPubPath string
}

// newPKI generates a throwaway cluster PKI in dir. Certificates are valid
// for a week, far longer than any test, and start an hour in the past so
// that small clock differences never matter.
func newPKI(dir string) (*pki, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating pki dir: %w", err)
	}
	p := &pki{}
	var err error
	if p.CA, err = newCA(dir, "ca", "kubernetes-ca"); err != nil {
		return nil, err
	}
	if p.FrontProxyCA, err = newCA(dir, "front-proxy-ca", "front-proxy-ca"); err != nil {
		return nil, err
	}
	p.Serving, err = issue(dir, "serving", p.CA, &x509.Certificate{
		Subject:     pkix.Name{CommonName: "kube-apiserver"},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames: []string{
			"localhost",
			"kubernetes",
			"kubernetes.default",
			"kubernetes.default.svc",
			"kubernetes.default.svc.cluster.local",
		},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1), net.ParseIP(serviceIP)},
	})
	if err != nil {
		return nil, err
	}
	clients := []struct {
		kp     **keyPair
		name   string
		ca     *keyPair
		cn     string
		groups []string
	}{
		{&p.Admin, "admin", p.CA, adminUser, []string{mastersGroup}},
		{&p.Scheduler, "kube-scheduler", p.CA, schedulerUser, nil},
		{&p.Controller, "kube-controller-manager", p.CA, controllerManagerUser, nil},
		{&p.FrontProxy, "front-proxy-client", p.FrontProxyCA, frontProxyClientUser, nil},
		{&p.KubeletClient, "kubelet-client", p.CA, kubeletClientUser, []string{mastersGroup}},
	}
	for _, c := range clients {
		*c.kp, err = issue(dir, c.name, c.ca, &x509.Certificate{
			Subject:     pkix.Name{CommonName: c.cn, Organization: c.groups},
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		})
		if err != nil {
			return nil, err
		}
	}

	// RSA rather than ECDSA for service account tokens: RS256 is what every
	// token consumer supports.
	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return nil, fmt.Errorf("generating service account key: %w", err)
	}
	keyPEM, err := encodeKey(saKey)
	if err != nil {
		return nil, fmt.Errorf("encoding service account key: %w", err)
	}
	pubDER, err := x509.MarshalPKIXPublicKey(saKey.Public())
	if err != nil {
		return nil, fmt.Errorf("encoding service account public key: %w", err)
	}
	p.ServiceAccountKeyPath = filepath.Join(dir, "sa.key")
	p.ServiceAccountPubPath = filepath.Join(dir, "sa.pub")
	if err := os.WriteFile(p.ServiceAccountKeyPath, keyPEM, 0o600); err != nil {
		return nil, fmt.Errorf("writing service account key: %w", err)
	}
	pubPEM := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER})
	if err := os.WriteFile(p.ServiceAccountPubPath, pubPEM, 0o600); err != nil {
		return nil, fmt.Errorf("writing service account public key: %w", err)
	}
	return p, nil
}

func newCA(dir, name, cn string) (*keyPair, error) {
	tmpl := &x509.Certificate{
		Subject:               pkix.Name{CommonName: cn},
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
	return issue(dir, name, nil, tmpl)
}

// issue creates a key and a certificate from tmpl signed by ca, or
// self-signed when ca is nil, and writes both to dir as name.crt/name.key.
func issue(dir, name string, ca *keyPair, tmpl *x509.Certificate) (*keyPair, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating %s key: %w", name, err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("generating %s serial: %w", name, err)
	}
	now := time.Now()
	tmpl.SerialNumber = serial
	tmpl.NotBefore = now.Add(-time.Hour)
	tmpl.NotAfter = now.Add(7 * 24 * time.Hour)
	if !tmpl.IsCA {
		tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	}

	parent, signer := tmpl, crypto.Signer(key)
	if ca != nil {
		parent, signer = ca.cert, ca.key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, key.Public(), signer)
	if err != nil {
		return nil, fmt.Errorf("signing %s certificate: %w", name, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parsing %s certificate: %w", name, err)
	}
	keyPEM, err := encodeKey(key)
	if err != nil {
		return nil, fmt.Errorf("encoding %s key: %w", name, err)
	}
	kp := &keyPair{
		CertPEM:  pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		KeyPEM:   keyPEM,
		CertPath: filepath.Join(dir, name+".crt"),
		KeyPath:  filepath.Join(dir, name+".key"),
		cert:     cert,
		key:      key,
	}
	if err := os.WriteFile(kp.CertPath, kp.CertPEM, 0o644); err != nil {
		return nil, fmt.Errorf("writing %s certificate: %w", name, err)
	}
	if err := os.WriteFile(kp.KeyPath, kp.KeyPEM, 0o600); err != nil {
		return nil, fmt.Errorf("writing %s key: %w", name, err)
	}
	return kp, nil
}

func encodeKey(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// nodeClient issues the client certificate of node name, as the kubelet's
// TLS bootstrap would: the Node authorizer and NodeRestriction admission
// know it as system:node:<name> in system:nodes.
func (p *pki) nodeClient(dir, name string) (*keyPair, error) {
	return issue(dir, "node-"+name, p.CA, &x509.Certificate{
		Subject:     pkix.Name{CommonName: "system:node:" + name, Organization: []string{"system:nodes"}},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
}
